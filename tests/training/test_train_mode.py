"""The loop trains in train mode: models loaded with ``from_pretrained`` come up in eval mode, so a loop that never
calls ``.train()`` runs the trained layers without dropout, and transformers' gradient checkpointing (active only
in training mode) never recomputes. Frozen parts stay in eval mode (the modules' own ``train()``)."""

from collections import Counter, defaultdict

import torch

from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.stage1 import train_stage1
from vlv.training.stage2 import train_stage2

TRAINED_BART = ("BartEncoderLayer", "BartDecoderLayer")
FROZEN_SD = ("CLIPEncoderLayer", "Transformer2DModel", "ResnetBlock2D")  # T, the UNet (and the VAE's blocks)


class Modes:
    """Every module's ``training`` flag at each forward call made while recording, by class name."""

    def __init__(self):
        self.seen: dict[str, set[bool]] = defaultdict(set)
        self.calls: Counter = Counter()
        self.recording = True

    def hook(self, module, args, output):
        if self.recording:
            name = type(module).__name__
            self.seen[name].add(module.training)
            self.calls[name] += 1

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def evaluator(self, *models):
        """An evaluation that leaves its models in eval mode, as real ones do; it makes no forward call, so every
        recorded call is a training step's."""
        for m in models:
            m.eval()
        return {}


def test_stage1_trains_the_bart_layers_in_train_mode_and_keeps_frozen_parts_in_eval(tiny_teacher, shapes_data,
                                                                                   tmp_path):
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes-pretrained",
                              num_queries=8, cache_vision=False, cache_latents=False, num_workers=0)
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=1, warmup_steps=0, progress=False)
    with Modes() as modes:
        assert train_stage1(settings, cfg, tmp_path / "run", evaluator=modes.evaluator) is not None
    for name in TRAINED_BART:  # the official trainable set: Florence's language model (from_pretrained: eval)
        assert modes.seen[name] == {True}, (name, modes.seen[name])
    for name in ("Florence2VisionBlock", *FROZEN_SD):  # the frozen DaViT, T, the UNet and the VAE
        assert modes.seen[name] == {False}, (name, modes.seen[name])


def test_stage2_trains_the_llm_in_train_mode_and_checkpointing_recomputes_every_layer(shapes_data, tmp_path,
                                                                                     monkeypatch):
    """The shipped chain (every part loaded from_pretrained) at mlp+llm+encoder with gradient checkpointing: each
    Qwen2 decoder layer runs its body twice per step (forward, then the recompute in backward). Module hooks fire
    once (transformers checkpoints ``forward`` inside them, and the recompute runs no hooks), so the body is
    counted by the calls of its MLP's ``forward``."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    bodies = Counter()
    forward = Qwen2MLP.forward

    def counted(self, *args, **kwargs):
        bodies[id(self)] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2MLP, "forward", counted)
    settings = Stage2Settings(decoder="shapes-teacher", encoder="shapes-stage1", lm="shapes-lm",
                              data=str(shapes_data["train"]), trainable="mlp+llm+encoder", max_new_tokens=24,
                              gradient_checkpointing=True, num_workers=0)
    steps = 2
    cfg = TrainConfig(steps=steps, batch_size=2, eval_every=1, warmup_steps=0, progress=False)
    with Modes() as modes:
        cap = train_stage2(settings, cfg, tmp_path / "run", evaluator=modes.evaluator)
    assert cap is not None
    layers = cap.lm.config.num_hidden_layers
    assert modes.seen["Qwen2DecoderLayer"] == {True}
    assert modes.calls["Qwen2DecoderLayer"] == layers * steps  # the hook sits outside the checkpoint
    assert len(bodies) == layers and set(bodies.values()) == {2 * steps}  # forward + recompute, every step
    for name in TRAINED_BART:  # the encoder's Florence language model trains at this level
        assert modes.seen[name] == {True}, (name, modes.seen[name])
    assert modes.seen["CLIPEncoderLayer"] == {False}  # frozen T
    # The shipped encoder trained its DaViT in stage 1 (trainable "all"), so it trains here too; a frozen one
    # would stay in eval (stage 1's test).
    assert modes.seen["Florence2VisionBlock"] == {not cap.encoder.vision_frozen} == {True}
