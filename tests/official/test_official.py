"""Importers of the official VLV code's checkpoints, checked against references computed by the official code.

The fixtures (``shared/fixtures/official-04bbfbb``, see its README) are tiny official checkpoints and the official
code's outputs on 4 images; this file is skipped when they are absent.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parents[3] / "shared" / "fixtures" / "official-04bbfbb"
if not FIXTURES.is_dir():
    pytest.skip(f"official fixtures absent ({FIXTURES})", allow_module_level=True)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vlv.decoder import DiffusionDecoder  # noqa: E402
from vlv.encoder import VLVEncoder, load_florence2  # noqa: E402
from vlv.official.florence2 import convert_florence2, prompt_ids  # noqa: E402
from vlv.official.stage1 import import_stage1  # noqa: E402
from vlv.text_encoder import clip_from_embeds  # noqa: E402

BASE_F2, BASE_SD = FIXTURES / "bases" / "florence2", FIXTURES / "bases" / "sd"
PLAIN, DEEPSPEED = FIXTURES / "stage1" / "plain" / "checkpoint_3.pt", FIXTURES / "stage1" / "deepspeed"
ATOL = 1e-5  # measured max abs differences: 1.2e-6 (image features) .. 9.0e-6 (BART decoder output)
SIZE = 64  # the official runs' --image_size (the README's image_inference_args): the official transform's crop

def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def refs():
    return load_file(FIXTURES / "refs" / "stage1.safetensors")


@pytest.fixture(scope="module")
def decoder():
    return DiffusionDecoder.from_pretrained(BASE_SD)


@pytest.fixture(scope="module")
def native_f2(tmp_path_factory):
    out = tmp_path_factory.mktemp("f2") / "native"
    counts = convert_florence2(BASE_F2, out)
    return out, counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory, native_f2):
    """Both official formats: the plain checkpoint with the remote-code base (converted into the run dir), the
    DeepSpeed dir with the already-native base (used in place)."""
    root = tmp_path_factory.mktemp("runs")
    counts = {"plain": import_stage1(PLAIN, BASE_F2, BASE_SD, root / "plain", crop_size=SIZE).counts,
              "deepspeed": import_stage1(DEEPSPEED, native_f2[0], BASE_SD, root / "deepspeed", crop_size=SIZE).counts}
    return {name: root / name for name in counts}, counts


def _images() -> np.ndarray:
    return np.stack([np.asarray(Image.open(FIXTURES / "images" / f"img{i}.png").convert("RGB")) for i in range(4)])


# ------------------------------------------------------------------------------------------ florence-2
def test_florence2_conversion(native_f2, refs):
    out, counts = native_f2
    assert counts == {"vision_tower": 144, "multi_modal_projector": 6, "language_model": 51, "dropped": 2}
    model = load_florence2(out).eval()
    lm = model.model.language_model
    assert lm.shared.weight is lm.encoder.embed_tokens.weight is lm.decoder.embed_tokens.weight
    assert model.config.text_config.vocab_size == 1325  # original vocabulary: ids keep their meaning
    with torch.no_grad():
        close(model.model.get_image_features(refs["s1.pixel_values"]).pooler_output, refs["s1.image_features"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tok) == 1325 and tok.convert_tokens_to_ids("<loc_0>") == 305
    assert prompt_ids(tok) == refs["s1.florence_input_ids"][0].tolist()
    text = json.loads((FIXTURES / "refs" / "refs.json").read_text())["florence_prompt_text"]
    assert tok(tok.bos_token + text + tok.eos_token, add_special_tokens=False).input_ids == prompt_ids(tok)


def test_florence2_refuses_a_native_dir_and_a_full_out(native_f2, tmp_path):
    with pytest.raises(ValueError, match="not a remote-code"):
        convert_florence2(native_f2[0], tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(FileExistsError):
        convert_florence2(BASE_F2, tmp_path / "full")


# ------------------------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("fmt", ["plain", "deepspeed"])
def test_stage1_matches_the_official_outputs(runs, fmt, refs, decoder):
    paths, counts = runs
    assert counts[fmt] == {"queries": 1, "phi": 4, "florence.language_model": 51, "dropped": 2,
                           "vae (== decoder, dropped)": 180, "unet (== decoder, dropped)": 208,
                           "text_encoder (== decoder, dropped)": 36, "florence.vision_tower (== base)": 144,
                           "florence.multi_modal_projector (== base)": 6}
    assert sum(counts[fmt].values()) == 632  # every key of the checkpoint
    assert (paths[fmt] / "florence2").is_dir() == (fmt == "plain")
    enc = VLVEncoder.from_pretrained(paths[fmt]).eval()
    cfg = enc.config
    assert (cfg.image_size, cfg.num_queries, cfg.text_dim) == (128, 77, 64)
    assert cfg.prompt_ids == refs["s1.florence_input_ids"][0].tolist()
    lm = enc.florence.model.language_model
    seen = {}
    hooks = [lm.encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("enc", o.last_hidden_state)),
             lm.decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("dec", o.last_hidden_state))]
    with torch.no_grad():
        close(enc.image_features(refs["s1.pixel_values"]), refs["s1.image_features"])
        z = enc(pixel_values=refs["s1.pixel_values"])
        t_z = clip_from_embeds(decoder.text_encoder, z)
    for h in hooks:
        h.remove()
    close(seen["enc"], refs["s1.encoder_last_hidden_state"])
    close(seen["dec"], refs["s1.decoder_last_hidden_state"])
    close(z, refs["s1.z"])
    close(t_z, refs["s1.T_z"])


def test_reconstruction_replays_the_official_ddpm_steps(runs, refs, decoder, monkeypatch):
    """With the recorded initial latents and DDPM variance noise, vlv's paper-mode reconstruction (the stock
    pipeline, CFG 2 against T("") over 77 positions) takes the official code's latents at every step."""
    import diffusers.schedulers.scheduling_ddpm as ddpm

    paths, _ = runs
    encoder = VLVEncoder.from_pretrained(paths["plain"]).eval()
    draws = iter(refs["s1.gen.ddpm_variance_noise"])
    monkeypatch.setattr(ddpm, "randn_tensor", lambda shape, **kw: next(draws).reshape(shape))
    seen = []

    def keep(pipe, i, t, kwargs):
        seen.append((int(t), kwargs["latents"].clone()))
        return kwargs

    with torch.no_grad():
        decoder.reconstruct(encoder(refs["s1.pixel_values"]), guidance_scale=2.0, steps=3, sampler="paper",
                            latents=refs["s1.gen.initial_latents"].clone(), callback_on_step_end=keep,
                            output_type="latent")
    assert [t for t, _ in seen] == refs["s1.gen.timesteps"].tolist()
    for (_, latents), expected in zip(seen, refs["s1.gen.latents_after_step"], strict=True):
        close(latents, expected)


def test_an_imported_run_dir_can_move(runs, refs, tmp_path):
    """The converted Florence-2 lives in the run dir and is named relatively, so a copied run dir loads alone."""
    paths, _ = runs
    moved = shutil.copytree(paths["plain"], tmp_path / "elsewhere")
    encoder = VLVEncoder.from_pretrained(moved).eval()
    assert encoder.config.florence2 == "florence2"
    with torch.no_grad():
        close(encoder(refs["s1.pixel_values"]), refs["s1.z"])


def test_stage1_loss_with_the_recorded_draws(runs, refs, decoder, monkeypatch):
    """vlv's own loss (DiffusionDecoder.loss -> vlv.diffusion.diffusion_loss), fed the official run's draws."""
    enc = VLVEncoder.from_pretrained(runs[0]["plain"]).eval()
    official = json.loads((FIXTURES / "refs" / "refs.json").read_text())["stage1_loss"]
    mean, std = refs["s1.loss.vae_posterior_mean"], refs["s1.loss.vae_posterior_std"]
    latents = (mean + std * refs["s1.loss.vae_posterior_noise"]) * decoder.vae.config.scaling_factor
    close(latents, refs["s1.loss.latent_scaled"], atol=0)
    t, noise = refs["s1.loss.timesteps"], refs["s1.loss.noise"]

    def randint(low, high, size, **kw):
        assert (low, high, tuple(size)) == (0, decoder.scheduler.config.num_train_timesteps, tuple(t.shape))
        return t.clone()

    def randn(*size, **kw):
        assert tuple(size[0] if len(size) == 1 else size) == tuple(noise.shape)
        return noise.clone()

    with torch.no_grad():
        z = enc(pixel_values=refs["s1.pixel_values"])
        monkeypatch.setattr(torch, "randint", randint)
        monkeypatch.setattr(torch, "randn", randn)
        loss = decoder.loss(latents, z).item()
    assert loss == pytest.approx(official, rel=1e-6)


def test_preprocessing(runs, refs):
    """An imported encoder carries the official transform (the run's --image_size crop, then Florence-2's
    processor): exact on the fixture's square images (measured 0)."""
    enc = VLVEncoder.from_pretrained(runs[0]["plain"])
    assert (enc.config.transform, enc.config.crop_size, enc.config.image_size) == ("official", SIZE, 128)
    pil = [Image.open(FIXTURES / "images" / f"img{i}.png") for i in range(4)]
    close(enc.preprocess(pil), refs["s1.pixel_values"], atol=1e-6)  # measured: 0
    close(enc.transform.pixels(_images()), refs["s1.pixel_values"], atol=1e-6)  # the crops as the reader cuts them


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth photo-like RGB image (gradients + blobs + a little noise), so resampling filters matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def _official_pixels(im: Image.Image, crop: int, processor) -> torch.Tensor:
    """The official chain, as Caption_inference.py runs it: torchvision's Resize(crop) (PIL bilinear, shorter side
    to crop, longer to int(crop * long / short); nothing when the shorter side is crop already) and
    CenterCrop(crop) (offsets int(round(d / 2)), Python's round: half to even), PILToTensor, then the Florence
    processor (transformers' own CLIPImageProcessor on PIL, which reproduces the fixture's refs bitwise)."""
    w, h = im.size
    short, long = min(w, h), max(w, h)
    size = (crop, int(crop * long / short)) if w <= h else (int(crop * long / short), crop)
    if size != (w, h):
        im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    im = im.crop((left, top, left + crop, top + crop))
    return processor(images=[np.asarray(im)], return_tensors="pt")["pixel_values"][0]


# (w, h): centre offsets where rounding half to even and flooring part (67, 71, 64x69), upscales (odd squares,
# 45x99), downscales (130x77, 97x61)
SHAPES = [(67, 64), (71, 64), (64, 69), (63, 63), (65, 65), (45, 99), (130, 77), (97, 61)]


def test_official_transform_on_non_square_and_odd_photos(runs, tmp_path):
    """The imported encoder's transform is the official chain to 1e-6 (measured 0) on photos of many shapes, both
    through preprocess (the API) and through the inference commands (their reader crops, then pixels); vlv's own
    square transform is not (measured: up to ~1.9 on these)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vlv.data.transforms import ImageTransform
    from vlv.inference import embed_files

    enc = VLVEncoder.from_pretrained(runs[0]["plain"]).eval()
    config = json.loads((runs[0]["plain"] / "florence2" / "preprocessor_config.json").read_text())
    processor = CLIPImageProcessorPil(**{k: config[k] for k in ("do_resize", "size", "resample", "do_rescale",
                                                                "do_normalize", "image_mean", "image_std",
                                                                "do_center_crop") if k in config})
    photos = [_photo(w, h, i) for i, (w, h) in enumerate(SHAPES)]
    want = torch.stack([_official_pixels(im, SIZE, processor) for im in photos])  # (N, 3, 128, 128)
    close(enc.preprocess(photos), want, atol=1e-6)
    vlv_square = ImageTransform("vlv", SIZE, 128, enc.config.image_mean, enc.config.image_std)
    assert (vlv_square(photos) - want).abs().max() > 0.1  # the crops differ: the official transform is needed
    paths = []
    for i, im in enumerate(photos):
        paths.append(tmp_path / f"p{i}.png")
        im.save(paths[-1])
    embed_files(paths, tmp_path / "z.safetensors", runs[0]["plain"], batch_size=3)
    with torch.no_grad():
        z = torch.cat([enc(want[i : i + 3]) for i in range(0, len(want), 3)])
    close(load_file(tmp_path / "z.safetensors")["z"], z, atol=1e-6)


# -------------------------------------------------------------------------------------------- strict
@pytest.fixture(scope="module")
def plain_state():
    return torch.load(PLAIN, map_location="cpu", weights_only=True)["model_state_dict"]


def _edited(state, tmp_path, edit):
    state = {k: v.clone() for k, v in state.items()}
    edit(state)
    path = tmp_path / "checkpoint_9.pt"
    torch.save({"step": 9, "model_state_dict": state}, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected key 'extra.weight'"),
    (lambda s: s.__setitem__("model.extra", torch.zeros(1)), "unexpected key 'model.extra'"),
    (lambda s: s.pop("model.language_model.model.encoder.layers.0.fc1.weight"),
     "missing key .*encoder.layers.0.fc1.weight"),
    (lambda s: s.pop("unet.conv_in.weight"), "missing key 'unet.conv_in.weight'"),
    (lambda s: s.__setitem__("language_proj.0.weight", torch.zeros(64, 32)), "language_proj.0.weight: shape"),
    (lambda s: s["model.vision_tower.convs.0.proj.weight"].add_(1), "Florence-2 dir .* does not match"),
], ids=["extra", "extra-florence", "missing", "missing-sd", "shape", "davit-differs"])
def test_stage1_is_strict(plain_state, native_f2, tmp_path, edit, message):
    ckpt = _edited(plain_state, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        import_stage1(ckpt, native_f2[0], BASE_SD, tmp_path / "run", crop_size=SIZE)
    assert not (tmp_path / "run").exists()  # nothing half-made is left


def test_stage1_refuses_a_decoder_whose_unet_differs(native_f2, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(BASE_SD, sd)
    weights = sd / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.bias"] = state["conv_in.bias"] + 1e-3
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"decoder dir .* does not match the checkpoint: unet.conv_in.bias differs"):
        import_stage1(PLAIN, native_f2[0], sd, tmp_path / "run", crop_size=SIZE)


def test_stage1_needs_a_consolidated_deepspeed_dir(native_f2, tmp_path):
    with pytest.raises(FileNotFoundError, match="zero_to_fp32"):
        import_stage1(DEEPSPEED / "step_3", native_f2[0], BASE_SD, tmp_path / "run", crop_size=SIZE)


# ----------------------------------------------------------------------------------------------- cli
@pytest.mark.slow
def test_cli_import_then_reconstruct(tmp_path, cli_run):
    from vlv.cli import main

    assert main(["import-official", "florence2", str(tmp_path / "nope"), "--out", str(tmp_path / "f2")]) == 2
    assert main(["import-official", "stage1", str(tmp_path / "nope.pt"), "--florence2", str(BASE_F2),
                 "--decoder", str(BASE_SD), "--out", str(tmp_path / "bad")]) == 2
    r = cli_run("import-official", "stage1", PLAIN, "--florence2", BASE_F2, "--decoder", BASE_SD, "--out",
             tmp_path / "run", "--image-size", SIZE)
    assert r.returncode == 0, r.stderr
    assert re.search(r"unet \(== decoder, dropped\) +208\n", r.stdout) and "(632 in all)" in r.stdout, r.stdout
    assert main(["reconstruct", str(FIXTURES / "images"), "--encoder", str(tmp_path / "run"), "--decoder",
                 str(BASE_SD), "--steps", "2", "--out", str(tmp_path / "recon")]) == 0  # in-process: one start less
    out = sorted(p.name for p in (tmp_path / "recon").glob("*.png"))
    assert out == [f"img{i}.png" for i in range(4)]
    assert Image.open(tmp_path / "recon" / "img0.png").size == (64, 64)
    # vlv embed: the official z and T(z) of the fixture images, read from their files (PIL resize to the
    # encoder's size, as the official processor does)
    assert main(["embed", str(FIXTURES / "images"), "--encoder", str(tmp_path / "run"), "--decoder", str(BASE_SD),
                 "--out", str(tmp_path / "z.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "z.safetensors"), framework="pt") as f:
        names = [Path(p).name for p in json.loads(f.metadata()["images"])]
        z, t_z = f.get_tensor("z"), f.get_tensor("T_z")
    refs = load_file(FIXTURES / "refs" / "stage1.safetensors")
    assert names == [f"img{i}.png" for i in range(4)]
    close(z, refs["s1.z"]), close(t_z, refs["s1.T_z"])
    # The imported run dir goes on like any stage-1 run: stage 1 from it (--init takes its architecture) and
    # stage 2 on it.
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "images", data)
    captions = json.loads((FIXTURES / "refs" / "refs.json").read_text())["stage2_captions"]
    (data / "captions.jsonl").write_text("".join(json.dumps({"image": f"img{i}.png", "caption": c}) + "\n"
                                                 for i, c in enumerate(captions)))
    common = ["--decoder", str(BASE_SD), "--data", str(data), "--steps", "1", "--batch-size", "2",
              "--warmup-steps", "0"]
    assert main(["train", "stage1", "--init", str(tmp_path / "run"), "--trainable", "official", "--out",
                 str(tmp_path / "again"), *common]) == 0
    again = VLVEncoder.from_pretrained(tmp_path / "again")
    assert (again.config.image_size, again.config.num_queries) == (128, 77)
    assert main(["train", "stage2", "--encoder", str(tmp_path / "run"), "--lm", str(FIXTURES / "bases" / "qwen2"),
                 "--out", str(tmp_path / "s2"), *common]) == 0
    assert (tmp_path / "s2" / "captioner.json").is_file()
