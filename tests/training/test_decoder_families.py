"""The chain against decoders beyond SD 2.x (tiny random init): with SD3, stage 1 trains, its run dir loads in one
call, stage 2 reads T = both CLIPs, and both plan; SDXL and FLUX.1 train through the same code."""

import numpy as np
import pytest
import torch

from vlv.api import VLV
from vlv.decoder import DiffusionDecoder
from vlv.errors import InvalidInput
from vlv.shapes.evaluate import EvalSettings, evaluate_run
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.text_encoder import CLIPStack, encode_embeds, load_text_encoder
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.draws import Draws
from vlv.training.stage1 import stage1_loss, train_stage1
from vlv.training.stage2 import train_stage2


def _settings(decoder, data, **kw):
    return Stage1Settings(decoder=str(decoder), data=str(data), **{"encoder": "shapes", "num_queries": 8, **kw})


def test_the_chain_trains_against_sd3_and_its_runs_load_in_one_call(tiny_sd3, shapes_data, tmp_path):
    run, run2 = tmp_path / "run", tmp_path / "s2"
    enc = train_stage1(_settings(tiny_sd3, shapes_data["train"], high_noise_fraction=0.25),
                       TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False), run)
    assert enc is not None and enc.config.text_dim == 24 + 16 and (run / "latents" / "cache.json").is_file()
    cap = train_stage2(Stage2Settings(decoder=str(tiny_sd3), encoder=str(run), lm="qwen2-shapes",
                                      data=str(shapes_data["train"]), max_new_tokens=4),
                       TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False), run2, progress=False,
                       tokenizer=build_shapes_tokenizer())
    assert cap is not None and isinstance(cap.text_encoder, CLIPStack) and cap.config.text_dim == 40
    vlv = VLV.from_pretrained(run, tiny_sd3, run2)
    images = sorted(shapes_data["val"].glob("*.png"))[:2]
    out = vlv.reconstruct(images, steps=2)
    assert [im.size for im in out] == [(32, 32)] * 2 and np.asarray(out[0]).std() > 0
    assert len(vlv.caption(images, num_beams=1)) == 2
    demo = tmp_path / "demo"  # the layout `vlv demo --teacher` leaves: the shapes evaluation draws through SD3
    for part, src in (("teacher", tiny_sd3), ("stage1", run), ("stage2", run2)):
        (demo / part).parent.mkdir(exist_ok=True)
        (demo / part).symlink_to(src)
    m = evaluate_run(demo, EvalSettings(n=2, examples=0, compositions=0), progress=False, force=True)
    assert {k: m[k]["n"] for k in ("teacher", "reconstruction", "captions", "caption_to_image")} == dict.fromkeys(
        ("teacher", "reconstruction", "captions", "caption_to_image"), 2)


def test_stage_2_reads_t_as_the_decoder_conditions_on_it(tiny_sd3, tmp_path):
    import shutil

    from vlv.checks import same_text_encoder
    from vlv.training.plan import meta_text_encoder

    te, decoder = load_text_encoder(tiny_sd3), DiffusionDecoder.from_pretrained(tiny_sd3)
    z = torch.randn(2, 5, 40)
    with torch.no_grad():
        assert torch.equal(encode_embeds(te, z), decoder.encode_text_embeds(z))
    meta = meta_text_encoder(tiny_sd3)
    assert isinstance(meta, CLIPStack) and meta.config.hidden_size == te.config.hidden_size == 40
    assert [p.shape for p in meta.parameters()] == [p.shape for p in te.parameters()]
    copy = shutil.copytree(tiny_sd3, tmp_path / "copy")
    assert same_text_encoder(tiny_sd3, copy)
    (copy / "text_encoder_2" / "model.safetensors").write_bytes(b"0" * 8)
    assert not same_text_encoder(tiny_sd3, copy)  # the second CLIP counts too


def test_cached_latents_train_as_the_images_do(tiny_sd3):
    """The latents cache holds unscaled posteriors; a step shifts and scales them as encoding online does."""
    decoder = DiffusionDecoder.from_pretrained(tiny_sd3)
    torch.manual_seed(0)
    images, vision = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 8)
    with torch.no_grad():
        dist = decoder.vae.encode(images).latent_dist

    def model(image_features=None, pixel_values=None):
        return torch.ones(2, 4, 40) * image_features.mean()

    online = stage1_loss(decoder, model, {"vision": vision, "images": images}, Draws(torch.Generator().manual_seed(3)))
    cached = stage1_loss(decoder, model, {"vision": vision, "mean": dist.mean, "std": dist.std},
                         Draws(torch.Generator().manual_seed(3)))
    assert torch.equal(online.mean, cached.mean)


@pytest.mark.parametrize("family", ["sd3", "sdxl", "flux"])
def test_a_run_plans_on_the_meta_device(family, request):
    from vlv.training.plan import meta_decoder, meta_text_encoder, plan_stage1

    path = request.getfixturevalue(f"tiny_{family}")
    decoder = meta_decoder(path)
    assert decoder.family.name == family and all(p.is_meta for p in decoder.parameters())
    plan = plan_stage1(_settings(path, "", image_size=32), TrainConfig(batch_size=2), target="cpu")
    assert plan.memory.peak > plan.memory.weights > 0 and plan.trainable > 0
    meta, te = meta_text_encoder(path), load_text_encoder(path)  # stage 2's T, as it loads
    assert type(meta) is type(te) and [p.shape for p in meta.parameters()] == [p.shape for p in te.parameters()]


def test_stage1_trains_against_sdxl_and_reconstructs(tiny_sdxl, shapes_data, tmp_path):
    run = tmp_path / "run"
    enc = train_stage1(_settings(tiny_sdxl, shapes_data["train"], high_noise_fraction=0.25),
                       TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False), run)
    assert enc is not None and enc.config.text_dim == 40
    out = VLV.from_pretrained(run, tiny_sdxl, captioner=None).reconstruct(sorted(shapes_data["val"].glob("*.png"))[:1],
                                                                          steps=2)
    assert out[0].size == (32, 32)


def test_stage1_trains_against_flux(tiny_flux, shapes_data, tmp_path):
    enc = train_stage1(_settings(tiny_flux, shapes_data["train"], image_size=32, high_noise_fraction=0.25),
                       TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False), tmp_path / "run")
    assert enc is not None and enc.config.text_dim == 24 + 32


def test_the_official_importers_take_an_sd2_dir_only(tiny_sd3, tmp_path):
    """The official code distils SD 2.1-base: an SD3 dir is refused in one line, before the checkpoint is read."""
    from vlv.official.stage1 import import_stage1
    from vlv.official.stage2 import import_stage2

    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"never read")
    with pytest.raises(InvalidInput, match="2.1-base"):
        import_stage1(ckpt, tmp_path, tiny_sd3, tmp_path / "out")
    with pytest.raises(InvalidInput, match="2.1-base"):
        import_stage2(ckpt, tmp_path, tiny_sd3, tmp_path, tmp_path / "out2")
