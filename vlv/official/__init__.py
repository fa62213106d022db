"""Importers of the official VLV code's checkpoints (github Tiezheng11/Vision-Language-Vision @ 04bbfbb) into
vlv's own dirs: a remote-code Florence-2 dir -> a native transformers Florence-2 dir (:mod:`vlv.official.florence2`),
an official stage-1 checkpoint -> a vlv stage-1 run dir (:mod:`vlv.official.stage1`), and an official stage-2
``model.pt`` -> a vlv stage-2 run dir (:mod:`vlv.official.stage2`).

Every import is strict: each key of the source is mapped, checked against a base dir and dropped, or dropped by
name; anything else (an unknown key, a missing one, a shape that does not fit) is one ValueError naming the key.
A checkpoint saved under mixed precision (bf16 / fp16, frozen parts included) is checked against its bases rounded
to that dtype, and the imported models compute with the frozen weights so rounded, as the checkpoint holds them.
This layer imports only vlv's core (encoder, decoder, captioner, config, modeling), never training, inference or
the CLI.
"""
