import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from vlv.data.datasets import InMemory
from vlv.data.records import read_records
from vlv.decoder import DiffusionDecoder
from vlv.diffusion import load_pipeline
from vlv.encoder import VLVEncoder
from vlv.shapes.metrics import stage1_evaluator
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.stage1 import build_encoder, frozen_decoder, train_stage1


def _settings(teacher, data, **kw):
    return Stage1Settings(decoder=str(teacher), data=str(data), **{"encoder": "shapes", "num_queries": 8, **kw})


def test_train_stage1_run_dir_describes_itself(tiny_teacher, shapes_data, tmp_path):
    run = tmp_path / "run"
    recipe = {"name": "test", "task": "stage1", "train": {"steps": 3}}
    enc = train_stage1(_settings(tiny_teacher, shapes_data["train"], phi_init_gain=4.0),
                       TrainConfig(steps=3, batch_size=4, lr=1e-3, eval_every=3, progress=False), run,
                       evaluator=stage1_evaluator(shapes_data["val"], 4), recipe=recipe)
    assert enc is not None
    meta = json.loads((run / "stage1.json").read_text())
    assert meta["settings"]["decoder"] == str(tiny_teacher) and (run / "latents" / "cache.json").exists()
    assert meta["recipe"] == recipe
    evals = [r["eval"] for r in json.loads((run / "checkpoint" / "trainer.json").read_text())["history"] if "eval" in r]
    # A 4-step teacher draws noise, so accuracy is 0 trained or not (no floor fits): the eval ran once, at the end.
    assert [e["step"] for e in evals] == [3] and {"recon_scene_accuracy", "recon_object_f1"} <= set(evals[-1])
    loaded = VLVEncoder.from_pretrained(run).eval()
    assert loaded.config.phi_init_gain == 4.0  # the run's setting reached the encoder it built
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(loaded.transform.pixels(x)), enc.eval()(enc.transform.pixels(x)))


def test_cached_latents_match_the_vae(tiny_teacher, shapes_data, tmp_path):
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    data = InMemory.of(shapes_data["train"], 64)
    from vlv.data.caches import posteriors
    from vlv.data.images import to_tensor

    cache = posteriors(decoder.vae, data)
    with torch.no_grad():  # the same batch as the cache's, so the same kernels
        dist = decoder.vae.encode(to_tensor(data.images)).latent_dist
    assert torch.allclose(cache["mean"], dist.mean, atol=1e-6) and torch.allclose(cache["std"], dist.std, atol=1e-6)


def test_the_teachers_latent_file_is_fp16_keyed_and_refuses_other_inputs(tiny_teacher, shapes_data, tmp_path):
    """One file (the shapes teacher's cache): fp16 of the posteriors, read back as written; another VAE or other
    data is refused, naming the field, and so is a file without a key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vlv.data.caches import latents_key, posteriors, posteriors_file
    from vlv.errors import InvalidInput

    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    data, path = InMemory.of(shapes_data["train"], 64), tmp_path / "latents.safetensors"
    got = posteriors_file(decoder.vae, data, path, batch_size=16)
    want = posteriors(decoder.vae, data, batch_size=16)
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k].half()) for k in ("mean", "std"))
    assert all(torch.equal(v, got[k]) for k, v in posteriors_file(decoder.vae, data, path).items())  # read, kept
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["vlv_cache"]) == latents_key(decoder.vae, data, 64)
    with pytest.raises(InvalidInput, match="data"):
        posteriors_file(decoder.vae, InMemory.of(shapes_data["train"], 64, limit=40), path)
    with torch.no_grad():
        decoder.vae.encoder.conv_in.bias.add_(1.0)
    with pytest.raises(InvalidInput, match="weights"):
        posteriors_file(decoder.vae, data, path)
    save_file({k: v.contiguous() for k, v in got.items()}, str(tmp_path / "old.safetensors"))  # as before keys
    with pytest.raises(InvalidInput, match="delete it"):
        posteriors_file(decoder.vae, data, tmp_path / "old.safetensors")


def test_a_models_config_hash_is_the_same_in_every_process():
    """diffusers' ``_use_default_values`` lists a set (its order differs per process): not part of the key."""
    from vlv.data.caches import config_hash

    a = {"latent_channels": 4, "_use_default_values": ["act_fn", "force_upcast"], "_name_or_path": "/a"}
    b = {"latent_channels": 4, "_use_default_values": ["force_upcast", "act_fn"], "_name_or_path": "/b"}
    assert config_hash(a) == config_hash(b) != config_hash({**a, "latent_channels": 8})


@pytest.mark.parametrize("unet_mode", ["eval", "train"])
def test_gradient_checkpointing_is_active_on_the_frozen_unet(tiny_teacher, unet_mode):
    """With checkpointing the frozen UNet keeps far fewer activations for backward, and the loss and z's gradients
    are the same: diffusers checkpoints whenever grad is on, in eval mode (vlv's frozen decoder) as in train mode
    (the official code's model.train() puts its frozen UNet there)."""
    settings = Stage1Settings(decoder=str(tiny_teacher), data="x", gradient_checkpointing=True)
    z0 = torch.randn(2, 8, 32)
    latents = torch.randn(2, 4, 16, 16)
    saved, losses, grads = {}, {}, {}
    for enabled in (False, True):
        pipe = load_pipeline(tiny_teacher)
        decoder = frozen_decoder(pipe, replace(settings, gradient_checkpointing=enabled))
        assert decoder.unet.is_gradient_checkpointing == enabled
        decoder.unet.train(unet_mode == "train")
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        z = z0[..., :decoder.text_dim].clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = decoder.loss(latents[:, :decoder.vae.config.latent_channels], z, torch.Generator().manual_seed(0))
        loss.backward()
        saved[enabled], losses[enabled], grads[enabled] = total[0], loss.detach(), z.grad
        assert all(p.grad is None for p in decoder.parameters())
    assert saved[True] < 0.5 * saved[False]
    assert torch.equal(losses[True], losses[False])
    assert torch.allclose(grads[True], grads[False], atol=1e-6) and grads[True].abs().sum() > 0


def test_cli_stage1_reconstruct_compose(tiny_teacher, shapes_data, tmp_path, cli):
    run = tmp_path / "s1"
    code, err = cli("train", "stage1", "--decoder", tiny_teacher, "--data", shapes_data["train"], "--out", run,
                    "--nq", 8, "--steps", 2, "--batch-size", 3, "--warmup-steps", 0)
    assert code == 0, err
    meta = json.loads((run / "stage1.json").read_text())  # the default recipe, with the flags' fields over it
    assert meta["recipe"]["name"] == "stage1/shapes" and meta["settings"]["encoder"] == "shapes-pretrained"
    assert meta["settings"]["cache_vision"] and (run / "vision").is_dir()  # the frozen DaViT ran once per image
    assert (meta["train"]["steps"], meta["train"]["warmup_steps"], meta["train"]["lr"]) == (2, 0, 1e-3)
    assert meta["settings"]["num_queries"] == 8 and meta["settings"]["phi_init_gain"] == 16.0
    names = [rec.image for rec in read_records(shapes_data["val"])][:3]
    imgs = [shapes_data["val"] / n for n in names]
    code, err = cli("reconstruct", *imgs, "--encoder", run, "--decoder", tiny_teacher, "--out", tmp_path / "rec",
                    "--steps", 2, "--batch-size", 2)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == sorted(names)
    assert Image.open(tmp_path / "rec" / names[0]).size == (64, 64)
    code, err = cli("compose", imgs[0], imgs[1], "--encoder", run, "--decoder", tiny_teacher, "--k", 3, "--steps", 2,
                    "--out", tmp_path / "c.png")
    assert code == 0, err
    assert Image.open(tmp_path / "c.png").size == (64, 64)
    code, err = cli("reconstruct", tmp_path / "missing.png", "--encoder", run, "--decoder", tiny_teacher, "--out",
                    tmp_path / "x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    train = shapes_data["train"]
    code, err = cli("train", "stage1", "--decoder", tiny_teacher, "--data", train, "--out", tmp_path / "v",
                    "--recipe", "shapes-scratch", "--cache-vision")  # that recipe trains the vision tower
    assert code == 2 and "vision tower" in err and len(err.strip().splitlines()) == 1, err
    code, err = cli("train", "stage1", "--decoder", tiny_teacher, "--data", train, "--out", tmp_path / "g",
                    "--init", run, "--phi-init-gain", 4)  # the gain would scale weights --init overwrites
    assert code == 2 and "--init" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.dist
def test_two_processes_agree(tiny_teacher, shapes_data, tmp_path):
    """Under torchrun (2 CPU processes, gloo), DDP keeps both ranks' weights identical."""
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("ddp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(tiny_teacher), str(shapes_data["train"]), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "of 2 done" in r.stdout
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    from vlv.shapes.config import TINY

    start = build_encoder(_settings(tiny_teacher, shapes_data["train"]), TINY.text_hidden, seed=0).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["queries"], start["queries"])  # it trained


def test_init_warm_starts_from_a_trained_encoder_and_checks_its_architecture(tiny_teacher, shapes_data, tmp_path):
    """--init copies every weight of a finished run (then trains on); a different architecture is refused."""
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False)
    first = train_stage1(_settings(tiny_teacher, shapes_data["train"]), cfg, tmp_path / "a")
    decoder = DiffusionDecoder.from_pretrained(tiny_teacher)
    settings = _settings(tiny_teacher, shapes_data["train"], init=str(tmp_path / "a"))
    fresh = build_encoder(settings, decoder.text_dim, seed=1)
    assert not torch.equal(fresh.queries, first.queries)
    from vlv.training.stage1 import init_from

    init_from(fresh, settings.init)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), first.state_dict().values(),
                                                 strict=True))
    more = build_encoder(_settings(tiny_teacher, "x", num_queries=16), decoder.text_dim, 0)
    with pytest.raises(ValueError, match="num_queries"):
        init_from(more, settings.init)
    fewer = build_encoder(_settings(tiny_teacher, "x", num_queries=4), decoder.text_dim, 0)
    init_from(fewer, settings.init)  # fewer queries: the first 4, so z is the first 4 positions of the source's
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        z, z4 = first.eval()(first.transform.pixels(x)), fewer.eval()(fewer.transform.pixels(x))
    assert z4.shape[1] == 4 and torch.allclose(z4, z[:, :4], atol=1e-6)
    second = train_stage1(settings, cfg, tmp_path / "b")  # and the run itself trains on from there
    assert second is not None and not torch.equal(second.queries, first.queries)


def test_cached_vision_features_train_as_the_pixels_do(tiny_teacher, shapes_data, tmp_path):
    """With a frozen vision tower its features are cached once (fp16): the first step's loss matches the pixel
    path, the run trains, and a vision tower that trains refuses the cache with a clear error."""
    from safetensors.torch import load_file

    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, log_every=1, progress=False)
    losses = {}
    for cached in (False, True):
        run = tmp_path / f"cached{cached}"
        enc = train_stage1(_settings(tiny_teacher, shapes_data["train"], trainable="official", cache_vision=cached),
                           cfg, run)
        assert enc is not None
        history = json.loads((run / "checkpoint" / "trainer.json").read_text())["history"]
        losses[cached] = history[0]["loss"]
    feats = load_file(tmp_path / "cachedTrue" / "vision" / "00000.safetensors")["features"]
    assert feats.dtype == torch.float16 and feats.shape == (len(read_records(shapes_data["train"])), 65, 128)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    with pytest.raises(ValueError, match="vision tower"):
        train_stage1(_settings(tiny_teacher, shapes_data["train"], cache_vision=True), cfg, tmp_path / "all")


def test_vision_cache_shards_resume_and_read_rows(shapes_data, tmp_path):
    """Shards of a few rows: a lost shard is recomputed alone, and rows across shards read back in any order."""
    from vlv.data.caches import Cache, vision_key, vision_rows, write_cache
    from vlv.data.datasets import FolderDataset
    from vlv.encoder import EncoderConfig

    torch.manual_seed(0)
    enc = VLVEncoder(EncoderConfig.named("shapes", 32, num_queries=4, trainable=["queries"]))
    data, ds = InMemory.of(shapes_data["train"], 64), FolderDataset(shapes_data["train"])
    key = vision_key(enc, ds, 64)
    write_cache(tmp_path / "v", key, ds, vision_rows(enc), 32, shard_rows=5, progress=False)
    parts = sorted((tmp_path / "v").glob("*.safetensors"))
    assert len(parts) == -(-len(data) // 5)
    kept = parts[0].stat().st_mtime_ns
    parts[1].unlink()
    write_cache(tmp_path / "v", key, ds, vision_rows(enc), 32, shard_rows=5, progress=False)
    assert parts[1].exists() and parts[0].stat().st_mtime_ns == kept
    cache = Cache(tmp_path / "v", want=key)
    idx = np.array([len(data) - 1, 0, 6, 6, 4])
    with torch.no_grad():
        want = enc.eval().image_features(enc.transform.pixels(data.images[idx]))
    assert len(cache) == len(data) and torch.allclose(cache[idx]["features"].float(), want, atol=1e-2, rtol=1e-2)


def test_a_cache_says_its_size_and_is_refused_where_it_does_not_fit(tiny_teacher, shapes_data, tmp_path,
                                                                     monkeypatch, capsys):
    """Before its first shard a cache prints its size (from a row computed on a blank image) and the free disk,
    and refuses in one line a disk it does not fit, leaving nothing behind."""
    from collections import namedtuple

    from vlv.cli import main
    from vlv.data import caches
    from vlv.data.datasets import FolderDataset
    from vlv.errors import InvalidInput

    ds = FolderDataset(shapes_data["train"])
    key = {"kind": "latents", "model": "m", "weights": "w", "data": "d", "resolution": 64, "dtype": "float16",
           "version": 1}

    def compute(images):
        return {"mean": torch.zeros(len(images), 4, 8, 8), "std": torch.ones(len(images), 4, 8, 8)}

    row = 2 * 4 * 8 * 8 * 2 + 1  # mean and std in fp16, and the ok flag
    caches.write_cache(tmp_path / "c", key, ds, compute, 16, shard_rows=10, progress=False)
    size = caches._size  # the print's units
    out = capsys.readouterr().out
    assert f"[cache latents] {len(ds)} samples x {size(row)} = {size(len(ds) * row)} on disk ({size(len(ds) * row)} " \
           "left to write)" in out and "free at" in out, out
    (tmp_path / "c" / "00001.safetensors").unlink()
    disk = namedtuple("usage", "total used free")
    monkeypatch.setattr(caches.shutil, "disk_usage", lambda path: disk(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InvalidInput, match=f"needs {size(10 * row)} more, the disk has {size(1000)} free"):
        caches.write_cache(tmp_path / "c", key, ds, compute, 16, shard_rows=10, progress=False)
    assert not (tmp_path / "c" / "00001.safetensors").exists()
    capsys.readouterr()
    assert main(["precompute", "latents", "--decoder", str(tiny_teacher), "--data", str(shapes_data["train"]),
                 "--out", str(tmp_path / "p"), "--num-workers", "0", "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "vlv:" in line]  # past the loading bars
    assert len(errors) == 1 and "--no-cache-latents" in errors[0] and not (tmp_path / "p").exists(), errors
