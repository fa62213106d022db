"""The SDXL family (tiny random-init StableDiffusionXLPipeline dir): T(z), added conditions, loss, reconstruction."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from vlv.checks import check_sd_dir, text_width
from vlv.decoder import DiffusionDecoder
from vlv.decoders.sdxl import SDXLDecoder
from vlv.diffusion import sampler_scheduler, tokenize
from vlv.shapes import world as shapes
from vlv.text_encoder import CLIPStack, load_text_encoder


def _stock(path):
    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(tiny_sdxl):
    return _stock(tiny_sdxl)


@pytest.fixture(scope="module")
def decoder(tiny_sdxl):
    return DiffusionDecoder.from_pretrained(tiny_sdxl)


def _z_of_ids(decoder, ids):
    a, b = decoder.text_encoder.encoders
    return torch.cat([a.get_input_embeddings()(ids), b.get_input_embeddings()(ids)], dim=-1)


def test_dir_is_read_as_its_family(tiny_sdxl, decoder, stock):
    assert type(decoder) is SDXLDecoder and type(DiffusionDecoder(stock)) is SDXLDecoder
    assert check_sd_dir(tiny_sdxl) == tiny_sdxl and decoder.text_dim == text_width(tiny_sdxl) == 40
    assert decoder.image_size == 32 and decoder.force_zeros_for_empty_prompt
    te = load_text_encoder(tiny_sdxl)  # the first CLIP as its dir names it: no projection
    assert isinstance(te, CLIPStack) and [type(e).__name__ for e in te.encoders] == \
        ["CLIPTextModel", "CLIPTextModelWithProjection"]


def test_conditioning_of_token_embeddings_is_the_stock_encoding(decoder, stock):
    caption = shapes.caption(shapes.scene_at(0, "train", 1))
    ids = tokenize(decoder.tokenizer, [caption])
    length = int((ids[0] == decoder.tokenizer.eos_token_id).nonzero()[0]) + 1
    with torch.no_grad():
        got = decoder.conditioning(_z_of_ids(decoder, ids[:, :length]))
        embeds, _, pooled, _ = stock.encode_prompt(caption, do_classifier_free_guidance=False)
    torch.testing.assert_close(got["prompt_embeds"], embeds[:, :length], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)


def test_unconditional_follows_the_dirs_empty_prompt_rule(decoder, tiny_sdxl_no_zeros):
    """force_zeros_for_empty_prompt (SDXL base): zeros; otherwise "" through both CLIPs over z's positions."""
    got = decoder.unconditional(7)
    assert got["negative_prompt_embeds"].shape == (1, 7, 40) and not got["negative_prompt_embeds"].any()
    assert got["negative_pooled_prompt_embeds"].shape == (1, 16) and not got["negative_pooled_prompt_embeds"].any()
    dec, pipe = DiffusionDecoder.from_pretrained(tiny_sdxl_no_zeros), _stock(tiny_sdxl_no_zeros)
    with torch.no_grad():
        got = dec.unconditional(7)
        _, neg, _, neg_pooled = pipe.encode_prompt(None, device="cpu", do_classifier_free_guidance=True,
                                                   prompt_embeds=torch.ones(1, 7, 40),
                                                   pooled_prompt_embeds=torch.ones(1, 16))
    assert got["negative_prompt_embeds"].abs().sum() > 0
    assert torch.equal(got["negative_prompt_embeds"], neg) and torch.equal(got["negative_pooled_prompt_embeds"],
                                                                            neg_pooled)


def test_loss_is_the_ddpm_loss_of_the_unet_with_added_conditions(decoder):
    """Written out: t ~ U{0..999}, eps, x_t = sqrt(a) x0 + sqrt(1 - a) eps, the UNet given T(z), the pooled vector and
    (32, 32, 0, 0, 32, 32), epsilon target, MSE."""
    torch.manual_seed(0)
    latents, z = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 40)
    with torch.no_grad():
        loss = decoder.loss(latents, z, torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(2)
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(latents.shape, generator=g)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        a = torch.cumprod(1 - betas, 0)[t].view(3, 1, 1, 1)
        c = decoder.conditioning(z)
        added = {"text_embeds": c["pooled_prompt_embeds"], "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 3)}
        pred = decoder.unet(a.sqrt() * latents + (1 - a).sqrt() * eps, t, encoder_hidden_states=c["prompt_embeds"],
                            added_cond_kwargs=added).sample
    torch.testing.assert_close(loss, ((pred - eps) ** 2).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["paper", "fast"])
def test_reconstruct_is_the_stock_pipeline(decoder, stock, sampler):
    z = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(2))
    got = decoder.reconstruct(z, guidance_scale=2.0, steps=3, sampler=sampler,
                              generator=torch.Generator().manual_seed(7))
    stock.scheduler = sampler_scheduler(sampler, stock.scheduler.config)
    with torch.no_grad():
        cond = decoder.conditioning(z)
        want = stock(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                     guidance_scale=2.0, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                     output_type="pt").images  # the stock negative branch: zeros, as the dir says
    assert got.shape == (2, 3, 32, 32) and torch.equal(got, want)
