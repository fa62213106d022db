"""Stage 1 against an SD3-layout decoder (tiny random init): it trains, its run dir loads in one call, it plans."""

import numpy as np
import pytest
import torch

from vlv.api import VLV
from vlv.decoder import DiffusionDecoder
from vlv.errors import InvalidInput
from vlv.training.config import Stage1Settings, TrainConfig
from vlv.training.draws import Draws
from vlv.training.stage1 import stage1_loss, train_stage1


def _settings(decoder, data, **kw):
    return Stage1Settings(decoder=str(decoder), data=str(data), **{"encoder": "shapes", "num_queries": 8, **kw})


def test_stage1_trains_against_sd3_and_the_run_reconstructs_in_one_call(tiny_sd3, shapes_data, tmp_path):
    run = tmp_path / "run"
    enc = train_stage1(_settings(tiny_sd3, shapes_data["train"]),
                       TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False), run)
    assert enc is not None and enc.config.text_dim == 24 + 16 and (run / "latents" / "cache.json").is_file()
    vlv = VLV.from_pretrained(run, tiny_sd3, captioner=None)
    images = sorted(shapes_data["val"].glob("*.png"))[:2]
    out = vlv.reconstruct(images, steps=2)
    assert [im.size for im in out] == [(32, 32)] * 2 and np.asarray(out[0]).std() > 0


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


def test_a_ddpm_setting_is_refused_before_loading(tiny_sd3, shapes_data, tmp_path):
    with pytest.raises(InvalidInput, match="high-noise-fraction"):
        train_stage1(_settings(tiny_sd3, shapes_data["train"], high_noise_fraction=0.25),
                     TrainConfig(steps=1, batch_size=2, progress=False), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_sd3_run_plans_on_the_meta_device(tiny_sd3):
    from vlv.training.plan import meta_decoder, plan_stage1

    decoder = meta_decoder(tiny_sd3)
    assert type(decoder).__name__ == "SD3Decoder" and all(p.is_meta for p in decoder.parameters())
    plan = plan_stage1(_settings(tiny_sd3, ""), TrainConfig(batch_size=2), target="cpu")
    assert plan.memory.peak > plan.memory.weights > 0 and plan.trainable > 0
