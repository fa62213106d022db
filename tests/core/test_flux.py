"""The FLUX.1 family (tiny random-init FluxPipeline dir, guidance embedded): T(z) through CLIP and T5, the loss on
2x2-packed latents, reconstruction through the stock pipeline."""

import pytest
import torch
from diffusers import FluxPipeline

from vlv.checks import check_sd_dir, text_width
from vlv.decoder import DiffusionDecoder
from vlv.decoders.flux import FluxDecoder
from vlv.diffusion import tokenize
from vlv.shapes import world as shapes
from vlv.text_encoder import CLIPAndT5, encode_embeds, load_text_encoder


@pytest.fixture(scope="module")
def stock(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def decoder(tiny_flux):
    return DiffusionDecoder.from_pretrained(tiny_flux)


def test_dir_is_read_as_its_family(tiny_flux, decoder, stock):
    assert type(decoder) is FluxDecoder and type(DiffusionDecoder(stock)) is FluxDecoder
    assert check_sd_dir(tiny_flux) == tiny_flux and decoder.text_dim == text_width(tiny_flux) == 24 + 32
    assert decoder.latent_scaling == (0.3611, 0.1159) and decoder.image_size == 256  # the pipeline's default
    te = load_text_encoder(tiny_flux)
    z = torch.randn(2, 5, 56)
    with torch.no_grad():
        assert isinstance(te, CLIPAndT5) and torch.equal(encode_embeds(te, z), decoder.encode_text_embeds(z))


def test_conditioning_of_token_embeddings_is_the_stock_encoding(decoder, stock):
    """z = CLIP's and T5's token embeddings of a caption ending in EOS, T5 given exactly those tokens."""
    caption = shapes.caption(shapes.scene_at(0, "train", 2))
    ids = tokenize(decoder.tokenizer, [caption])
    length = int((ids[0] == decoder.tokenizer.eos_token_id).nonzero()[0]) + 1
    ids = ids[:, :length]
    clip, t5 = decoder.text_encoder.clip, decoder.text_encoder.t5
    z = torch.cat([clip.get_input_embeddings()(ids), t5.get_input_embeddings()(ids)], dim=-1)
    with torch.no_grad():
        got = decoder.conditioning(z)
        embeds, pooled, _ = stock.encode_prompt(caption, max_sequence_length=length)
    torch.testing.assert_close(got["prompt_embeds"], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)


def test_unconditional_is_the_stock_empty_prompt_over_z_positions(decoder, stock):
    with torch.no_grad():
        embeds, pooled, _ = stock.encode_prompt("", max_sequence_length=6)
        got = decoder.unconditional(6)
    assert torch.equal(got["negative_prompt_embeds"], embeds) and torch.equal(got["negative_pooled_prompt_embeds"],
                                                                              pooled)


def _pack(x):  # (B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch's channels side by side
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def _unpack(x, c, h, w):
    b = x.shape[0]
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_loss_is_flow_matching_on_packed_latents(decoder):
    """Written out: u ~ U[0, 1) (the FLUX scripts' density), sigma from the unshifted training schedule (dynamic
    shifting), packed noisy latents, timestep / 1000, embedded guidance 3.5, text ids zeros, image ids (0, row,
    col), unpacked prediction against eps - x0."""
    torch.manual_seed(0)
    latents, z = torch.randn(2, 4, 8, 6), torch.randn(2, 5, 56)
    with torch.no_grad():
        loss = decoder.loss(latents, z, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        u = torch.rand(2, generator=g)
        sigma = (torch.arange(1000, 0, -1, dtype=torch.float32) / 1000)[(u * 1000).long()].view(2, 1, 1, 1)
        eps = torch.randn(latents.shape, generator=g)
        c = decoder.conditioning(z)
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij")
        img_ids = torch.stack([torch.zeros(4, 3), rows, cols], -1).reshape(12, 3)
        pred = decoder.transformer(hidden_states=_pack((1 - sigma) * latents + sigma * eps),
                                   timestep=sigma.flatten(), guidance=torch.full((2,), 3.5),
                                   pooled_projections=c["pooled_prompt_embeds"],
                                   encoder_hidden_states=c["prompt_embeds"], txt_ids=torch.zeros(5, 3),
                                   img_ids=img_ids).sample
        want = ((_unpack(pred, 4, 8, 6) - (eps - latents)) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_reconstruct_is_the_stock_pipeline_with_real_cfg(decoder, stock):
    """vlv's guidance scale is the stock true_cfg_scale against T(""); the embedded guidance stays 3.5."""
    z = torch.randn(2, 6, 56, generator=torch.Generator().manual_seed(2))
    got = decoder.reconstruct(z, guidance_scale=2.0, steps=3, generator=torch.Generator().manual_seed(7),
                              height=32, width=32)
    with torch.no_grad():
        cond, uncond = decoder.conditioning(z), decoder.unconditional(6)
        want = stock(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                     negative_prompt_embeds=uncond["negative_prompt_embeds"].expand(2, -1, -1),
                     negative_pooled_prompt_embeds=uncond["negative_pooled_prompt_embeds"].expand(2, -1),
                     true_cfg_scale=2.0, guidance_scale=3.5, num_inference_steps=3, height=32, width=32,
                     generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert got.shape == (2, 3, 32, 32) and torch.equal(got, want)


def test_odd_latents_are_refused(decoder):
    with pytest.raises(ValueError, match="2x2"):
        decoder.loss(torch.randn(1, 4, 5, 6), torch.randn(1, 3, 56))
