import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from vlv import shipped as presets
from vlv.diffusion import tokenize
from vlv.shapes import world as shapes
from vlv.shapes.config import TINY
from vlv.shapes.teacher import TextToImage, UNetTask, build_scheduler, build_text_encoder, build_unet
from vlv.shapes.tokenizers import build_tokenizer
from vlv.training.config import TrainConfig
from vlv.training.loop import train


def test_tokenizer_round_trips_captions(tiny_teacher):
    saved = StableDiffusionPipeline.from_pretrained(tiny_teacher).tokenizer
    for tok in (build_tokenizer(), saved):
        for i in range(50):
            text = shapes.caption(shapes.scene_at(0, "train", i))
            ids = tok(text).input_ids
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.model_max_length == 77 and tok("a purple dragon").input_ids[1] == tok.unk_token_id


def test_stock_pipeline_draws_from_a_teacher_dir(tiny_teacher):
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_teacher / name).exists()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)  # no vlv code in the loop
    out = pipe(prompt=["a small red circle at the top left", ""], num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()


def _unet_task(seed=0):
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = TextToImage(build_text_encoder(TINY, tok), build_unet(TINY))
    captions = [shapes.caption(shapes.scene_at(0, "train", i)) for i in range(16)]
    g = torch.Generator().manual_seed(1)
    latents = {"mean": torch.randn(16, 4, 8, 8, generator=g), "std": torch.full((16, 4, 8, 8), 0.01)}  # conv: any size
    return UNetTask(model, build_scheduler(TINY), latents, tokenize(tok, captions), tokenize(tok, [""])[0], 1.0)


def test_loss_decreases_on_a_fixed_batch():
    task = _unet_task()
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    batch = task.batch(0, 0, 16, torch.device("cpu"))
    losses = []
    for _ in range(40):
        loss = task.loss(task.model, batch, torch.Generator().manual_seed(0)).mean  # same noise, same t
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = dict(steps=8, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, progress=False)
    full = _unet_task()
    train(full, TrainConfig(**cfg), tmp_path / "full")
    parts = _unet_task()
    train(parts, TrainConfig(**cfg, stop_after=3), tmp_path / "parts")
    resumed = _unet_task(seed=123)  # fresh random init: everything must come from the checkpoint
    state = train(resumed, TrainConfig(**cfg), tmp_path / "parts")
    assert state.step == 8
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    ckpt = tmp_path / "parts" / "checkpoint"
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 8
    assert set(load_file(ckpt / "model.safetensors")) == {n for n, p in full.model.named_parameters()}


@pytest.mark.skipif(not presets.installed("shapes-teacher"),
                    reason="shapes-teacher weights not shipped in this checkout yet")
def test_shipped_teacher_loads_strictly():
    from vlv.diffusion import load_pipeline
    from vlv.shapes.config import TeacherConfig
    from vlv.shapes.teacher import build_unet, build_vae

    path = presets.resolve_decoder("shapes-teacher")
    cfg = TeacherConfig(**json.loads((path / "teacher.json").read_text())["config"])
    pipe = load_pipeline(path)
    for built, loaded, sub in ((build_unet(cfg), pipe.unet, "unet"), (build_vae(cfg), pipe.vae, "vae")):
        weights = load_file(path / sub / "diffusion_pytorch_model.safetensors")
        built.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        assert set(built.state_dict()) == set(loaded.state_dict())


def test_cli_sample_writes_images(tiny_teacher, tmp_path, cli):
    from PIL import Image

    run = ["teacher", "sample", tiny_teacher, "--steps", "2"]
    code, err = cli(*run, "--prompt", "a small red circle at the top left", "--out", tmp_path / "a.png")
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    (tmp_path / "caps.txt").write_text("a small red circle at the top left\na large blue square at the bottom right\n")
    code, err = cli(*run, "--captions", tmp_path / "caps.txt", "--out", tmp_path / "many")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["000000.png", "000001.png"]
    code, err = cli("teacher", "sample", tmp_path / "nowhere", "--prompt", "x", "--out", tmp_path / "b.png")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_export_checkpoint_equals_the_final_export(tiny_teacher, tmp_path):
    """The finished tiny run's EMA checkpoint, exported, is exactly the teacher training exported."""
    from vlv.shapes.teacher import export_checkpoint

    out = export_checkpoint(tiny_teacher, tmp_path / "exported", dtype=torch.float32)
    a, b = StableDiffusionPipeline.from_pretrained(tiny_teacher), StableDiffusionPipeline.from_pretrained(out)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor
    assert json.loads((out / "teacher.json").read_text())["training"]["unet_step"] == 4


def test_teacher_train_resumes_only_with_its_own_phase_settings(shapes_data, tmp_path, capsys):
    """A teacher run started with per-phase flags resumes with them: another phase's lr is named and refused,
    how a phase stops or evaluates is not a change."""
    from vlv.cli import main

    out = tmp_path / "t"
    base = ["teacher", "train", "--tiny", "--data", str(shapes_data["train"]), "--out", str(out), "--vae-steps", "4",
            "--vae-batch-size", "8", "--unet-steps", "2", "--unet-batch-size", "8", "--unet-warmup-steps", "0"]
    assert main([*base, "--vae-stop-after", "2"]) == 0
    assert json.loads((out / "training" / "vae" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    capsys.readouterr()
    assert main([*base, "--unet-lr", "5e-4"]) == 2
    assert "unet.lr" in capsys.readouterr().err
    assert main([*base, "--unet-eval-every", "7"]) == 0
    record = json.loads((out / "teacher.json").read_text())["training"]["recipe"]
    assert record["name"] == "teacher/shapes" and (record["vae"]["steps"], record["unet"]["batch_size"]) == (4, 8)
