"""The paper's measurements on real data (arXiv 2507.07104, Sec. 4), each writing ``metrics.json`` and a page.

``captions`` (BLEU-1..4, ROUGE-L and CIDEr-D with coco-caption's scorers, METEOR/SPICE where Java runs, CLIPScore
and RefCLIPScore), ``images`` (FID and KID with a user-supplied TorchScript Inception, CLIP image similarity),
``clip`` (a local CLIP model's embeddings), ``protocols`` (Table 1: images -> captions -> a text-to-image pipeline
-> FID; Tables 4/5: images -> z -> the decoder -> FID) and ``report`` (the page). Nothing is downloaded: every
model is a local file or dir the user names. This package sits above the core and ``vlv.inference`` and knows
nothing of the shapes world (which runs the same commands on its own data).
"""
