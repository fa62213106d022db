"""--export-every: a run writes loadable stage-1 / stage-2 dirs of its weights so far, RUN/exports/step_N."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlv.captioner import Captioner
from vlv.encoder import VLVEncoder
from vlv.errors import InvalidInput
from vlv.modeling import trainable_state
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.loop import export_dir, train
from vlv.training.stage1 import STAGE1_FILE, train_stage1
from vlv.training.stage2 import STAGE2_FILE, train_stage2


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False, **kw})


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exports_load_in_one_call_and_hold_the_weights_of_their_step(tiny_teacher, shapes_data, tmp_path):
    """Step N's export holds what an N-step run ends with (same lr up to step N: warm-up 0, constant lr), loads
    with VLVEncoder / Captioner.from_pretrained as it is, and a stage-1 export is a stage-1 run dir stage 2 trains
    from; the last step's weights are the run dir itself, and no temp dir is left."""
    s1 = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes", num_queries=8,
                        num_workers=0)
    train_stage1(s1, _cfg(2, export_every=1), tmp_path / "s1", progress=False)
    one = train_stage1(s1, _cfg(1), tmp_path / "s1-one", progress=False)
    step1 = export_dir(tmp_path / "s1", 1)
    assert sorted(p.name for p in (tmp_path / "s1" / "exports").iterdir()) == ["step_1"]
    assert (step1 / STAGE1_FILE).is_file()
    assert _equal(trainable_state(VLVEncoder.from_pretrained(step1)), trainable_state(one))

    s2 = Stage2Settings(decoder=str(tiny_teacher), encoder=str(step1), lm="shapes-lm",
                        data=str(shapes_data["train"]), trainable="mlp+llm", num_workers=0)
    train_stage2(s2, _cfg(3, export_every=2, schedule="constant"), tmp_path / "s2", progress=False)
    two = train_stage2(s2, _cfg(2, schedule="constant"), tmp_path / "s2-two", progress=False)
    step2 = export_dir(tmp_path / "s2", 2)
    assert sorted(p.name for p in (tmp_path / "s2" / "exports").iterdir()) == ["step_2"]
    assert (step2 / STAGE2_FILE).is_file()
    assert _equal(trainable_state(Captioner.from_pretrained(step2)), trainable_state(two))


class _Toy:
    """Fit y = 3x; its export is its weights."""

    name = "toy"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        x = torch.randn(batch_size, 1, generator=torch.Generator().manual_seed(step))
        return x, 3 * x

    def loss(self, model, batch, draws):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    def evaluate(self, model):
        return {}


class _Exporting(_Toy):
    def export(self, out):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, out / "weights.safetensors")


def test_an_export_holds_the_ema_weights_and_leaves_training_as_it_was(tmp_path):
    """With an EMA the export holds the EMA's weights of that step (what a run ending there hands back), and the
    run trains on from its own weights: it ends as a run without exports does."""
    cfg = _cfg(3, lr=1e-1, ema_decay=0.5, schedule="constant")
    exporting, plain, short = _Exporting(), _Toy(), _Toy()
    train(exporting, replace(cfg, export_every=1), tmp_path / "exporting")
    train(plain, cfg, tmp_path / "plain")
    train(short, replace(cfg, steps=2), tmp_path / "short")
    assert _equal(exporting.model.state_dict(), plain.model.state_dict())
    step2 = load_file(export_dir(tmp_path / "exporting", 2) / "weights.safetensors")
    assert _equal(step2, short.model.state_dict())
    assert not _equal(step2, load_file(export_dir(tmp_path / "exporting", 1) / "weights.safetensors"))


def test_a_task_without_an_export_refuses_export_every(tmp_path):
    with pytest.raises(InvalidInput, match="--export-every: toy has no loadable export"):
        train(_Toy(), _cfg(2, export_every=1), tmp_path / "run")
