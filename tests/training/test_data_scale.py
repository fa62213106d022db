"""Training at scale on CPU-sized data: stages 1 and 2 stream --data (folder, shards) through workers, with exact
resume, bad samples counted, precomputed keyed caches, and gradient accumulation."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlv.data.caches import Cache, latents_key, latents_rows, write_cache
from vlv.data.datasets import FolderDataset, InMemory, TarShards, open_dataset
from vlv.data.images import to_tensor
from vlv.data.loader import load_batch
from vlv.data.shards import write_shards
from vlv.decoder import DiffusionDecoder
from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.loop import train
from vlv.training.stage1 import Stage1Task, build_encoder, train_stage1
from vlv.training.stage2 import Stage2Task, build_captioner, train_stage2

CFG = {"batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False}


def _settings(teacher, data, **kw):
    return Stage1Settings(decoder=str(teacher), data=str(data), **{"encoder": "shapes", "num_queries": 8,
                                                                    "num_workers": 0, **kw})


def _weights(run):
    return load_file(run / "checkpoint" / "model.safetensors")


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _losses(run):
    return [r["loss"] for r in json.loads((run / "checkpoint" / "trainer.json").read_text())["history"]
            if "loss" in r]


@pytest.fixture(scope="module")
def shards(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "tars"
    write_shards(FolderDataset(shapes_data["train"]), out, shard_size=20)
    return out


@pytest.fixture(scope="module")
def lm(shapes_data, tmp_path_factory):
    from vlv.shapes.tokenizers import build_shapes_tokenizer
    from vlv.training.lm import train_lm

    out = tmp_path_factory.mktemp("lm") / "lm"
    train_lm(LMSettings(data=str(shapes_data["train"])), TrainConfig(steps=2, batch_size=4, progress=False), out,
             tokenizer=build_shapes_tokenizer())
    return out


# ------------------------------------------------------------------------------------ same numbers as in RAM
def test_streamed_stage1_trains_the_weights_of_the_in_ram_path(tiny_teacher, shapes_data, tmp_path):
    """The folder read lazily by workers gives bit-identical weights to the InMemory path."""
    cfg = TrainConfig(steps=3, **CFG)
    settings = _settings(tiny_teacher, shapes_data["train"], cache_latents=False, num_workers=2)
    train_stage1(settings, cfg, tmp_path / "streamed")
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    encoder = build_encoder(settings, decoder.text_dim, cfg.seed)
    task = Stage1Task(encoder, decoder, InMemory.of(shapes_data["train"], 64), seed=cfg.seed)
    train(task, cfg, tmp_path / "ram")
    assert _equal(_weights(tmp_path / "streamed"), _weights(tmp_path / "ram"))
    assert _losses(tmp_path / "streamed") == _losses(tmp_path / "ram")


def test_streamed_stage2_trains_the_weights_of_the_in_ram_path(tiny_teacher, shapes_data, lm, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=3, lr=1e-3, progress=False)
    train_stage1(_settings(tiny_teacher, shapes_data["train"]), TrainConfig(steps=1, **CFG), tmp_path / "s1")
    settings = Stage2Settings(decoder=str(tiny_teacher), encoder=str(tmp_path / "s1"), lm=str(lm),
                              data=str(shapes_data["train"]), num_workers=2)
    train_stage2(settings, cfg, tmp_path / "streamed")
    captioner = build_captioner(settings, cfg.seed)
    data = InMemory.of(shapes_data["train"], captioner.encoder.config.image_size)
    train(Stage2Task(captioner, data, seed=cfg.seed), cfg, tmp_path / "ram")
    assert _equal(_weights(tmp_path / "streamed"), _weights(tmp_path / "ram"))


def test_stage2_reads_parquet_columns_of_any_name(tiny_teacher, shapes_data, lm, tmp_path):
    """--image-column / --caption-column: a parquet of the folder under other column names trains its weights."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = FolderDataset(shapes_data["train"])
    rows = [ref.read(i) for i in range(len(ref))]
    pq.write_table(pa.table({"jpg": [r.image for r in rows], "txt": [r.caption for r in rows]}), tmp_path / "d.parquet")
    cfg = TrainConfig(steps=2, batch_size=3, lr=1e-3, progress=False)
    train_stage1(_settings(tiny_teacher, shapes_data["train"]), TrainConfig(steps=1, **CFG), tmp_path / "s1")
    common = {"decoder": str(tiny_teacher), "encoder": str(tmp_path / "s1"), "lm": str(lm), "num_workers": 0}
    train_stage2(Stage2Settings(data=str(shapes_data["train"]), **common), cfg, tmp_path / "folder")
    with pytest.raises(ValueError, match="image"):
        train_stage2(Stage2Settings(data=str(tmp_path / "d.parquet"), **common), cfg, tmp_path / "default-columns")
    train_stage2(Stage2Settings(data=str(tmp_path / "d.parquet"), image_column="jpg", caption_column="txt", **common),
                 cfg, tmp_path / "parquet")
    assert _equal(_weights(tmp_path / "parquet"), _weights(tmp_path / "folder"))


def test_stage1_from_shards_takes_the_folders_batches_and_losses(tiny_teacher, shapes_data, shards, tmp_path):
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    encoder = build_encoder(_settings(tiny_teacher, shards), decoder.text_dim, 0)
    tasks = [Stage1Task(encoder, decoder, open_dataset(d), seed=0, num_workers=w)
             for d, w in ((shapes_data["train"], 0), (shards, 2))]
    for step in range(3):
        a, b = (t.batch(step, 0, 5, torch.device("cpu")) for t in tasks)
        assert torch.equal(a["images"], b["images"])
    for t in tasks:
        t.close()
    cfg = TrainConfig(steps=3, grad_accum=2, **CFG)
    for name, data in (("folder", shapes_data["train"]), ("shards", shards)):
        assert train_stage1(_settings(tiny_teacher, data, num_workers=2), cfg, tmp_path / name) is not None
    assert _losses(tmp_path / "folder") == _losses(tmp_path / "shards")
    assert _equal(_weights(tmp_path / "folder"), _weights(tmp_path / "shards"))
    meta = json.loads((tmp_path / "shards" / "stage1.json").read_text())
    assert meta["global_batch"] == {"per_process": 4, "processes": 1, "grad_accum": 2, "global": 8}
    assert json.loads((tmp_path / "shards" / "data.json").read_text())["bad_samples"] == 0


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_teacher, shards, tmp_path):
    settings = _settings(tiny_teacher, shards, cache_latents=False, num_workers=2)
    full = TrainConfig(steps=5, checkpoint_every=100, **CFG)
    train_stage1(settings, full, tmp_path / "whole")
    stopped = TrainConfig(steps=5, checkpoint_every=100, stop_after=2, **CFG)
    assert train_stage1(settings, stopped, tmp_path / "resumed") is None
    assert train_stage1(settings, full, tmp_path / "resumed") is not None  # the loader restarts at step 2
    assert _equal(_weights(tmp_path / "whole"), _weights(tmp_path / "resumed"))


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_teacher, shards, tmp_path):
    """SIGKILL (no handler runs) to the training process and its decoding workers mid-run; the same command then
    resumes from the last checkpoint and ends bit-identical to a run never killed."""
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "vlv.cli", "train", "stage1", "--recipe", "shapes-scratch", "--decoder",
           str(tiny_teacher), "--data", str(shards), "--nq", "8", "--num-workers", "2", "--no-cache-latents",
           "--steps", "40", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "5", "--checkpoint-every", "2",
           "--log-every", "1"]
    assert subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True, timeout=600).returncode == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(run)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    meta = run / "checkpoint" / "trainer.json"
    deadline = time.monotonic() + 300
    while not meta.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished first
    killed_at = json.loads(meta.read_text())["step"]
    assert killed_at < 40
    assert subprocess.run([*cmd, "--out", str(run)], capture_output=True, timeout=600).returncode == 0
    assert _equal(_weights(tmp_path / "whole"), _weights(run))


# ---------------------------------------------------------------------------------------------- bad samples
def _corrupt(shards, tmp_path, i=5):
    """A copy of the shards with sample i's image garbled (its PNG header kept)."""
    out = tmp_path / "bad"
    out.mkdir()
    for p in sorted(shards.glob("*.tar")):
        (out / p.name).write_bytes(p.read_bytes())
    shard = out / "00000.tar"
    data = bytearray(shard.read_bytes())
    off, size = TarShards([shard]).image[i]
    data[off + 40 : off + size] = b"\0" * (size - 40)
    shard.write_bytes(bytes(data))
    return out


def test_bad_samples_are_skipped_counted_and_saved_or_stop_the_run(tiny_teacher, shards, tmp_path):
    bad = _corrupt(shards, tmp_path)
    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-3, progress=False)  # one epoch: every sample once
    for cached in (False, True):  # read by the workers / an empty row of the latents cache
        run = tmp_path / f"run{cached}"
        assert train_stage1(_settings(tiny_teacher, bad, cache_latents=cached), cfg, run) is not None
        saved = json.loads((run / "data.json").read_text())
        assert saved["bad_samples"] == 1 and saved["names"][0].startswith("000005")
    assert not Cache(tmp_path / "runTrue" / "latents").ok[5] and Cache(tmp_path / "runTrue" / "latents").ok.sum() == 47
    with pytest.raises(ValueError, match="000005"):
        train_stage1(_settings(tiny_teacher, bad, cache_latents=False, on_bad_image="fail"), cfg, tmp_path / "f")


# --------------------------------------------------------------------------------------------------- caches
def test_a_precomputed_latents_cache_holds_the_vae_posterior_in_fp16(tiny_teacher, shards, tmp_path):
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    ds = open_dataset(shards)
    write_cache(tmp_path / "c", latents_key(decoder.vae, ds, 64), ds, latents_rows(decoder.vae), 16,
                shard_rows=32, progress=False)
    cache = Cache(tmp_path / "c", want=latents_key(decoder.vae, ds, 64))
    idx = np.array([47, 0, 33, 5])
    pixels = load_batch(ds, idx, 64)["images"]
    with torch.no_grad():
        dist = decoder.vae.encode(to_tensor(pixels.numpy())).latent_dist
    rows = cache[idx]
    assert rows["mean"].dtype == torch.float16 and cache.ok.all()
    torch.testing.assert_close(rows["mean"].float(), dist.mean, rtol=2e-3, atol=2e-3)  # fp16 precision
    torch.testing.assert_close(rows["std"].float(), dist.std, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_training_reads_a_cache_from_vlv_precompute_and_refuses_a_wrong_key(tiny_teacher, shapes_data, shards,
                                                                              tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vlv.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = cli("precompute", "latents", "--decoder", tiny_teacher, "--data", shards, "--out", tmp_path / "lat",
            "--num-workers", 0, "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = TrainConfig(steps=2, **CFG)
    given = train_stage1(_settings(tiny_teacher, shards, latents_cache=str(tmp_path / "lat")), cfg, tmp_path / "a")
    train_stage1(_settings(tiny_teacher, shards), cfg, tmp_path / "b")  # the cache made in the run dir
    assert given is not None and not (tmp_path / "a" / "latents").exists()
    assert _equal(_weights(tmp_path / "a"), _weights(tmp_path / "b"))  # same fp16 rows, same steps
    with pytest.raises(ValueError, match=r"data .* resolution"):  # other samples, other size
        train_stage1(_settings(tiny_teacher, shapes_data["val"], image_size=32, latents_cache=str(tmp_path / "lat")),
                     cfg, tmp_path / "c")
    r = cli("train", "stage1", "--decoder", tiny_teacher, "--data", shapes_data["val"], "--out", tmp_path / "d",
            "--nq", 8, "--steps", 1, "--latents-cache", tmp_path / "lat")
    last = r.stderr.strip().splitlines()[-1]  # after the decoder's loading bars: the refusal, on one line
    assert r.returncode == 2 and last.startswith("vlv: error:") and "(data '48:" in last, r.stderr


def test_a_killed_precompute_resumes_by_skipping_finished_shards(tiny_teacher, shards, tmp_path):
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    ds = open_dataset(shards)
    key, rows = latents_key(decoder.vae, ds, 64), latents_rows(decoder.vae)
    for rank in (0, 1):  # two ranks: shards 0, 2 and shard 1
        write_cache(tmp_path / "c", key, ds, rows, 8, shard_rows=16, rank=rank, world_size=2, progress=False)
    parts = sorted((tmp_path / "c").glob("*.safetensors"))
    assert [p.name for p in parts] == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    whole = Cache(tmp_path / "c")[np.arange(48)]
    kept = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # killed mid-write (without the atomic rename)
    with pytest.raises(ValueError, match="unfinished"):
        Cache(tmp_path / "c")
    write_cache(tmp_path / "c", key, ds, rows, 8, shard_rows=16, progress=False)
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in parts if p.name != "00001.safetensors")
    again = Cache(tmp_path / "c")[np.arange(48)]
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_with_both_caches_a_step_decodes_no_image(tiny_teacher, shards, tmp_path):
    """The official trainable set keeps the vision tower frozen: features + posteriors cached, pixels never read."""
    from vlv.data.caches import vision_key, vision_rows

    settings = _settings(tiny_teacher, shards, trainable="official")
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    encoder = build_encoder(settings, decoder.text_dim, 0)
    ds = open_dataset(shards)
    write_cache(tmp_path / "lat", latents_key(decoder.vae, ds, 64), ds, latents_rows(decoder.vae), 16,
                progress=False)
    write_cache(tmp_path / "vis", vision_key(encoder, ds, 64), ds, vision_rows(encoder), 16, progress=False)

    class NoPixels(TarShards):
        def read(self, i):
            raise AssertionError("a step decoded an image")

    blind = NoPixels(ds.shards)
    task = Stage1Task(encoder, decoder, blind, Cache(tmp_path / "lat"), vision=Cache(tmp_path / "vis"), seed=0)
    batch = task.batch(0, 0, 4, torch.device("cpu"))
    assert "images" not in batch and batch["vision"].shape[0] == 4
    cfg = TrainConfig(steps=2, **CFG)
    run = train_stage1(_settings(tiny_teacher, shards, trainable="official", latents_cache=str(tmp_path / "lat"),
                                 vision_cache=str(tmp_path / "vis")), cfg, tmp_path / "run")
    assert run is not None


# -------------------------------------------------------------------------------------- gradient accumulation
class _Regression:
    """A linear fit on fixed data: no randomness in the loss, so accumulation can be compared exactly."""

    name = "toy"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)
        torch.manual_seed(0)
        self.model = torch.nn.Linear(5, 1)

    def trainable(self):
        return self.model

    def batch(self, step, rank, batch_size, device, world_size=1):
        from vlv.data.sampling import step_indices

        idx = torch.from_numpy(step_indices(32, 0, step, rank, world_size, batch_size))
        return self.x[idx], self.y[idx]

    def loss(self, model, batch, draws):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1]), len(batch[0])

    def evaluate(self, model):
        return {}


def test_grad_accum_of_two_equals_a_double_batch(tmp_path):
    results = {}
    for accum, batch in ((2, 4), (1, 8)):
        task = _Regression()
        train(task, TrainConfig(steps=3, batch_size=batch, grad_accum=accum, lr=1e-2, progress=False),
              tmp_path / f"a{accum}")
        results[accum] = [p.detach().clone() for p in task.model.parameters()]
    start = [p.detach() for p in _Regression().model.parameters()]
    assert not torch.allclose(results[1][0], start[0])  # it trained
    for a, b in zip(results[1], results[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
