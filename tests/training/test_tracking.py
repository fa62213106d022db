"""Watching a run: held-out losses that move only with the weights, samples (reconstructions, captions) written
into the run dir, and loss, lr, throughput and evaluations sent to accelerate's trackers (--report-to)."""

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from PIL import Image

from vlv.data.datasets import InMemory
from vlv.errors import InvalidInput
from vlv.text_encoder import load_text_encoder
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.loop import train
from vlv.training.stage1 import build_encoder, train_stage1, val_loss_evaluator
from vlv.training.stage2 import build_captioner, held_out_caption_loss, train_stage2, val_caption_evaluator
from vlv.training.tracking import ImageGrid, Texts, sample_path


class FakeTracker(GeneralTracker):
    """An in-memory tracker, passed to the Accelerator the way accelerate takes custom ones (``log_with``)."""

    name = "fake"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logs, self.images, self.finished = None, [], [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, {k: [np.asarray(x) for x in v] for k, v in values.items()}))

    def finish(self):
        self.finished = True

    def values(self, key):
        """{step: value} of one key."""
        return {step: v[key] for step, v in self.logs if key in v}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Toy:
    """y = 3x with one weight; each batch takes 0.5 s of the fake clock, each evaluation 100 s and shows samples."""

    name = "toy"

    def __init__(self, clock):
        torch.manual_seed(0)
        self.model, self.clock = torch.nn.Linear(1, 1, bias=False), clock

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        self.clock.now += 0.5
        x = torch.randn(batch_size, 1, generator=torch.Generator().manual_seed(step))
        return x, 3 * x

    def loss(self, model, batch, draws):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    def evaluate(self, model):
        self.clock.now += 100.0
        grid = np.full((4, 6, 3), 200, dtype=np.uint8)
        return {"val_loss": float(model.weight.item()), "grid": ImageGrid(grid), "captions": Texts(("a red", "b"))}


def _cfg(**kw):
    return TrainConfig(**{"steps": 4, "batch_size": 4, "lr": 0.05, "log_every": 2, "progress": False, **kw})


def _run(tmp_path, name, **kw):
    clock, tracker = Clock(), FakeTracker()
    cfg = _cfg(**kw)
    accelerator = Accelerator(cpu=True, log_with=[tracker], gradient_accumulation_steps=cfg.grad_accum)
    state = train(Toy(clock), cfg, tmp_path / name, accelerator, clock=clock)
    return tracker, state, accelerator


def test_the_trackers_get_loss_lr_throughput_and_evaluations_with_their_samples(tmp_path):
    tracker, state, accelerator = _run(tmp_path, "run", eval_every=2, warmup_steps=4)
    assert tracker.config["lr"] == 0.05 and tracker.config["betas"] == "(0.9, 0.999)"  # stored as hparams
    assert sorted(tracker.values("train/lr")) == [2, 4]
    assert tracker.values("train/lr") == {2: pytest.approx(0.05 * 2 / 4), 4: pytest.approx(0.05)}  # warm-up
    # 4 items per 0.5 s step, whatever the 100 s evaluations between the log steps took
    assert tracker.values("train/items_per_s") == {2: 8.0, 4: 8.0}
    assert all(math.isfinite(v) and v > 0 for v in tracker.values("train/loss").values())
    assert set(tracker.values("eval/val_loss")) == {2, 4}
    run = tmp_path / "run"
    for step in (2, 4):
        grid = run / "val" / "grid" / f"step-{step:06d}.png"
        assert np.array_equal(np.asarray(Image.open(grid)), np.full((4, 6, 3), 200, dtype=np.uint8))
        assert (run / "val" / "captions" / f"step-{step:06d}.txt").read_text() == "a red\nb\n"
        assert tracker.values("eval/captions")[step] == "a red\n\nb"
    assert [(step, list(v)) for step, v in tracker.images] == [(2, ["eval/grid"]), (4, ["eval/grid"])]
    assert tracker.images[0][1]["eval/grid"][0].shape == (4, 6, 3)
    # the run's history keeps the scalars, not the samples; the trackers are closed and released
    evals = [row["eval"] for row in state.history if "eval" in row]
    assert [set(e) for e in evals] == [{"val_loss", "step", "elapsed_s"}] * 2
    assert tracker.finished and accelerator.trackers == []
    assert not list(run.rglob("*.tmp"))


def test_the_logged_loss_is_the_mean_of_the_steps_since_the_last_log(tmp_path):
    every, _, _ = _run(tmp_path, "every", log_every=1)
    pairs, _, _ = _run(tmp_path, "pairs", log_every=2)
    losses = every.values("train/loss")
    assert pairs.values("train/loss") == {2: pytest.approx((losses[1] + losses[2]) / 2),
                                          4: pytest.approx((losses[3] + losses[4]) / 2)}


def test_report_to_tensorboard_needs_tensorboard_and_says_so_in_one_line(monkeypatch, tiny_teacher, shapes_data,
                                                                         tmp_path, capsys):
    import vlv.training.tracking as tracking
    from vlv.cli import main

    monkeypatch.setattr(tracking, "is_tensorboard_available", lambda: False)
    with pytest.raises(InvalidInput, match="pip install 'vlv\\[tracking\\]'"):
        train(Toy(Clock()), _cfg(report_to="tensorboard"), tmp_path / "toy")
    assert main(["train", "stage1", "--decoder", str(tiny_teacher), "--data", str(shapes_data["train"]),
                 "--encoder", "shapes", "--no-cache-vision", "--report-to", "tensorboard",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard is not installed" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was made


# ---------------------------------------------------------------------------------------------- stage 1
def _photos(folder, n=5):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_stage1_evaluations_show_held_out_images_over_their_reconstructions(tiny_teacher, shapes_data, tmp_path):
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8, num_workers=0)
    evaluator = val_loss_evaluator(_photos(tmp_path / "val"), n=5)
    train_stage1(settings, TrainConfig(steps=2, batch_size=4, eval_every=1, progress=False), tmp_path / "run",
                 progress=False, evaluator=evaluator)
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder

    decoder = DiffusionDecoder.from_pretrained(tiny_teacher).eval()
    size = decoder.image_size
    grids = [np.asarray(Image.open(tmp_path / "run" / "val" / "reconstructions" / f"step-{s:06d}.png"))
             for s in (1, 2)]
    assert all(g.shape == (2 * size, 4 * size, 3) for g in grids)  # the first 4 images over their reconstructions
    val = InMemory.of(tmp_path / "val", size)
    assert np.array_equal(grids[0][:size], np.concatenate(list(val.images[:4]), axis=1))
    # the noise is fixed: the final weights' grid again is the step-2 grid, bit for bit
    again = evaluator(VLVEncoder.from_pretrained(tmp_path / "run").eval(), decoder)
    assert np.array_equal(again["reconstructions"].pixels, grids[1])


# ---------------------------------------------------------------------------------------------- stage 2
@pytest.fixture(scope="module")
def stage1_dir(tiny_teacher, shapes_data, tmp_path_factory):
    """An untrained shapes encoder (Nq = 8) saved as a stage-1 run."""
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8)
    width = load_text_encoder(tiny_teacher).config.hidden_size
    return build_encoder(settings, width, seed=0).save_pretrained(tmp_path_factory.mktemp("stage1") / "run")


def _stage2(teacher, stage1, data, **kw):
    return Stage2Settings(decoder=str(teacher), encoder=str(stage1), lm="shapes-lm", data=str(data),
                          **{"trainable": "mlp", "max_new_tokens": 24, "num_workers": 0, **kw})


def test_the_held_out_caption_loss_is_fixed_and_moves_with_the_weights(tiny_teacher, stage1_dir, shapes_data):
    captioner = build_captioner(_stage2(tiny_teacher, stage1_dir, shapes_data["train"]), seed=0).eval()
    data = InMemory.of(shapes_data["val"], captioner.encoder.transform.crop_size)
    loss = held_out_caption_loss(captioner, data)
    assert held_out_caption_loss(captioner, data) == loss  # bit for bit
    assert held_out_caption_loss(captioner, data, batch_size=2) == pytest.approx(loss, rel=1e-5)  # per token
    assert math.isfinite(loss) and loss > 0
    with torch.no_grad():
        captioner.psi[0].weight.add_(0.05 * torch.randn_like(captioner.psi[0].weight))
    assert held_out_caption_loss(captioner, data) != loss


def _captioned(folder, source, n=4):
    """Image-caption pairs that are not a shapes folder: images and captions only, no scenes."""
    folder.mkdir()
    rows = [json.loads(line) for line in (source / "captions.jsonl").read_text().splitlines()][:n]
    for row in rows:
        (folder / row["image"]).write_bytes((source / row["image"]).read_bytes())
    (folder / "captions.jsonl").write_text("".join(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n"
                                                   for r in rows))
    return folder, rows


def test_stage2_evaluations_record_the_held_out_loss_and_sample_captions(tiny_teacher, stage1_dir, shapes_data,
                                                                         tmp_path):
    val, rows = _captioned(tmp_path / "val", shapes_data["val"])
    train_stage2(_stage2(tiny_teacher, stage1_dir, shapes_data["train"]),
                 TrainConfig(steps=2, batch_size=4, eval_every=1, progress=False), tmp_path / "run",
                 evaluator=val_caption_evaluator(val, n=4))
    history = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())["history"]
    losses = [row["eval"]["val_loss"] for row in history if "eval" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[0] != losses[1]
    lines = (tmp_path / "run" / "val" / "captions" / "step-000002.txt").read_text().splitlines()
    assert len(lines) == 4
    assert all(row["image"] in line and f"(reference: {row['caption']})" in line
               for row, line in zip(rows, lines, strict=True))


def test_a_bad_stage2_val_is_refused_in_one_line_before_anything_loads(tmp_path, tiny_teacher, stage1_dir,
                                                                       shapes_data, capsys):
    from vlv.cli import main

    (tmp_path / "empty").mkdir()
    for val, says in ((tmp_path / "nothing", "no such dataset"), (tmp_path / "empty", "no captions.jsonl"),
                      (_photos(tmp_path / "photos"), "has no caption")):
        with pytest.raises(InvalidInput, match="^--val") as refused:
            val_caption_evaluator(val, n=4)
        assert str(val) in str(refused.value) and says in str(refused.value)
    assert main(["train", "stage2", "--encoder", str(tmp_path / "s1"), "--lm", "shapes-lm", "--data",
                 str(shapes_data["train"]), "--val", str(tmp_path / "photos"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no caption" in err[0]
    assert not (tmp_path / "run").exists()


def test_samples_go_under_the_run_dir_by_key_and_step(tmp_path):
    assert sample_path(tmp_path, "captions", 100, Texts(("x",))) == tmp_path / "val" / "captions" / "step-000100.txt"
    grid = ImageGrid(np.zeros((2, 2, 3), dtype=np.uint8))
    assert sample_path(tmp_path, "reconstructions", 7, grid) == tmp_path / "val" / "reconstructions" / "step-000007.png"


def test_report_to_tensorboard_writes_events_a_tensorboard_reads(tiny_teacher, shapes_data, tmp_path):
    """The real tracker (the 'tracking' extra), through the command line: RUN/logs/TASK holds loss, lr,
    throughput, the held-out loss and the samples."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlv.cli import main

    val, _ = _captioned(tmp_path / "val", shapes_data["val"])
    common = ["--val", str(val), "--eval-n", "4", "--eval-every", "2", "--steps", "2", "--log-every", "1",
              "--batch-size", "4", "--num-workers", "0", "--report-to", "tensorboard"]
    assert main(["train", "stage1", "--decoder", str(tiny_teacher), "--data", str(shapes_data["train"]),
                 "--encoder", "shapes", "--nq", "8", "--no-cache-vision", "--out", str(tmp_path / "s1"), *common]) == 0
    assert main(["train", "stage2", "--encoder", str(tmp_path / "s1"), "--lm", "shapes-lm", "--trainable", "mlp",
                 "--data", str(shapes_data["train"]), "--out", str(tmp_path / "s2"), *common]) == 0
    for run, task, unit, sample in (("s1", "stage1", "images", "reconstructions"), ("s2", "stage2", "tokens", None)):
        events = EventAccumulator(str(tmp_path / run / "logs" / task)).Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", f"train/{unit}_per_s", "eval/val_loss"} <= scalars
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
        if sample:
            assert events.Tags()["images"] == [f"eval/{sample}"]
        else:
            assert any("eval/captions" in tag for tag in events.Tags()["tensors"])  # add_text's summaries


@pytest.mark.dist
def test_on_several_processes_only_the_main_one_reports_and_counts_every_rank(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("tracking_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), tmp_path / "run", tmp_path], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert other == {"started": False, "logs": []}
    logged = {}
    for step, values in main["logs"]:
        logged.setdefault(step, {}).update(values)
    assert logged[2]["train/items_per_s"] == logged[4]["train/items_per_s"] == (4 + 5) / 0.5  # both ranks' items
    assert logged[4]["eval/captions"] == "rank 0"
    assert (tmp_path / "run" / "val" / "captions" / "step-000004.txt").read_text() == "rank 0\n"
