"""The SD3-layout shapes teacher: a dir the stock StableDiffusion3Pipeline loads and draws from, the training
forward equal to that pipeline's function, and the first teacher's loop guarantees (loss falls, exact resume)."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from safetensors.torch import load_file

from vlv.diffusion import tokenize
from vlv.shapes import world as shapes
from vlv.shapes.config import TINY_SD3, sd3_teacher_recipe
from vlv.shapes.teacher_sd3 import (
    FlowTask,
    SD3TextToImage,
    build_scheduler,
    build_text_encoders,
    build_transformer,
    export_checkpoint,
    latent_geometry,
    make_pipeline,
    source_parts,
    train_sd3_teacher,
)
from vlv.training.config import TrainConfig
from vlv.training.loop import train

CAPTIONS = ["a small red circle at the top left", "",
            "a large blue square at the top right and a small green triangle at the bottom left"]


@pytest.fixture(scope="module")
def tiny_cfg(tiny_teacher):
    return replace(TINY_SD3, source=str(tiny_teacher))


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory, shapes_data, tiny_cfg):
    """A tiny SD3-layout teacher trained for a few steps, evaluated once through the stock pipeline."""
    recipe = sd3_teacher_recipe(settings={"eval_n": 3, "eval_guidance": [2.0], "eval_steps": 2},
                                transformer={"steps": 4, "batch_size": 8, "warmup_steps": 0, "eval_every": 4})
    out = train_sd3_teacher(shapes_data["train"], tmp_path_factory.mktemp("sd3") / "t", tiny_cfg, recipe,
                            val=shapes_data["val"], progress=False, command="test")
    assert out is not None
    return out


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    vae, tok = source_parts(cfg)
    _, size, channels = latent_geometry(vae)
    return vae, tok, SD3TextToImage(build_text_encoders(cfg, tok), build_transformer(cfg, size, channels),
                                    cfg.t5_tokens)


def test_stock_pipeline_loads_and_draws_from_the_dir(tiny_sd3, tiny_teacher):
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_sd3 / part).is_dir(), part
    # No vlv code from here on; no T5, as diffusers documents it for SD3.
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    tr, clips = pipe.transformer.config, (pipe.text_encoder.config, pipe.text_encoder_2.config)
    assert tr.pooled_projection_dim == sum(c.projection_dim for c in clips)
    assert tr.joint_attention_dim >= sum(c.hidden_size for c in clips)
    source = json.loads((tiny_teacher / "vae" / "config.json").read_text())
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.scaling_factor == source["scaling_factor"]
    out = pipe(prompt=CAPTIONS[:2], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()
    record = json.loads((tiny_sd3 / "teacher.json").read_text())
    evals = [h["eval"] for h in record["training"]["history"]["transformer"] if "eval" in h]
    assert record["layout"] == "sd3" and evals and 0.0 <= evals[-1]["scene_accuracy_cfg2"] <= 1.0


def test_training_forward_is_the_stock_pipelines_function(tiny_cfg):
    """One zero token counted t5_tokens times == the pipeline's t5_tokens zero tokens: same transformer output."""
    vae, tok, model = _model(tiny_cfg)
    pipe = make_pipeline(vae, model, tok, build_scheduler(tiny_cfg))
    _, size, channels = latent_geometry(vae)
    x, t = torch.randn(3, channels, size, size), torch.tensor([20.0, 500.0, 990.0])
    with torch.no_grad():
        ours = model(x, t, tokenize(tok, CAPTIONS))
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False)
        assert embeds.shape[1] == tok.model_max_length + tiny_cfg.t5_tokens  # the context trained on is shorter
        stock = copy.deepcopy(model.transformer)
        stock.set_attn_processor(JointAttnProcessor2_0())
        ref = stock(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def _task(cfg, seed=0):
    vae, tok, model = _model(cfg, seed)
    captions = [shapes.caption(shapes.scene_at(0, "train", i)) for i in range(16)]
    g = torch.Generator().manual_seed(1)
    latents = {"mean": torch.randn(16, 4, 16, 16, generator=g), "std": torch.full((16, 4, 16, 16), 0.01)}
    return FlowTask(model, build_scheduler(cfg), latents, tokenize(tok, captions), tokenize(tok, [""])[0], 1.0)


def test_loss_decreases_on_a_fixed_batch(tiny_cfg):
    task = _task(tiny_cfg)
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
    batch = task.batch(0, 0, 16, torch.device("cpu"))
    losses = []
    for _ in range(20):
        loss = task.loss(task.model, batch, torch.Generator().manual_seed(0)).mean  # same noise, same t
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, progress=False)
    full = _task(tiny_cfg)
    train(full, TrainConfig(**cfg), tmp_path / "full")
    parts = _task(tiny_cfg)
    train(parts, TrainConfig(**cfg, stop_after=3), tmp_path / "parts")
    resumed = _task(tiny_cfg, seed=123)  # fresh random init: everything must come from the checkpoint
    assert train(resumed, TrainConfig(**cfg), tmp_path / "parts").step == 6
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    saved = load_file(tmp_path / "parts" / "checkpoint" / "model.safetensors")
    assert set(saved) == {n for n, _ in full.model.named_parameters()}  # the two CLIPs train with the transformer
    assert any(k.startswith("text_encoder_2.") for k in saved)


def test_export_checkpoint_equals_the_final_export(tiny_sd3, tmp_path):
    out = export_checkpoint(tiny_sd3, tmp_path / "exported")
    a, b = (StableDiffusion3Pipeline.from_pretrained(d, text_encoder_3=None, tokenizer_3=None) for d in (tiny_sd3, out))
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    record = json.loads((out / "teacher.json").read_text())
    assert record["layout"] == "sd3" and record["training"]["transformer_step"] == 4
    assert record["training"]["command"] == "test"  # the finished run's


def test_cli_trains_resumes_and_refuses_the_other_layouts_flags(shapes_data, tiny_teacher, tmp_path, capsys):
    from vlv.cli import main

    out = tmp_path / "t"
    base = ["teacher", "train", "--layout", "sd3", "--tiny", "--source", str(tiny_teacher), "--data",
            str(shapes_data["train"]), "--out", str(out), "--transformer-steps", "3", "--transformer-batch-size", "4",
            "--transformer-warmup-steps", "0"]
    assert main([*base, "--transformer-stop-after", "2"]) == 0
    assert json.loads((out / "training" / "transformer" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    capsys.readouterr()
    assert main([*base, "--transformer-lr", "1e-3"]) == 2
    assert "transformer.lr" in capsys.readouterr().err
    assert main([*base, "--unet-steps", "3"]) == 2
    assert "--unet-steps" in capsys.readouterr().err
    assert main([*base, "--high-noise-fraction", "0.5"]) == 2
    assert main([*base[:2], "--recipe", "shapes-sd3", *base[4:]]) == 0  # the recipe names its layout
    record = json.loads((out / "teacher.json").read_text())["training"]
    assert record["recipe"]["name"] == "teacher/shapes-sd3" and record["recipe"]["transformer"]["steps"] == 3
    assert main(["teacher", "export", str(out), "--out", str(tmp_path / "e"), "--fp16"]) == 0  # the layout's own
    assert json.loads((tmp_path / "e" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    capsys.readouterr()
    assert main(["teacher", "train", "--layout", "sd2", "--recipe", "shapes-sd3", "--data", "d", "--out", "x"]) == 2
    assert main(["teacher", "train", "--data", "d", "--out", "x", "--weighting-scheme", "mode"]) == 2
    assert "--weighting-scheme" in capsys.readouterr().err


def test_cli_sample_writes_images(tiny_sd3, tmp_path, cli):
    from PIL import Image

    run = ["teacher", "sample", tiny_sd3, "--steps", "2"]
    code, err = cli(*run, "--prompt", CAPTIONS[0], "--out", tmp_path / "a.png")
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    code, err = cli(*run, "--sampler", "paper", "--prompt", "x", "--out", tmp_path / "b.png")
    assert code == 2 and len(err.strip().splitlines()) == 1
