"""The SD3 family (tiny random-init StableDiffusion3Pipeline dir, no T5): T(z), the loss, reconstruction."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from vlv.checks import check_sd_dir, text_length, text_width
from vlv.data.images import to_pil
from vlv.decoder import DiffusionDecoder
from vlv.decoders.sd3 import T5_LENGTH, SD3Decoder, tail_biases
from vlv.diffusion import tokenize
from vlv.errors import InvalidInput
from vlv.shapes import world as shapes


@pytest.fixture(scope="module")
def stock(tiny_sd3):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def decoder(tiny_sd3):
    return DiffusionDecoder.from_pretrained(tiny_sd3)


def _z_of_ids(decoder, ids):
    """z whose halves are each CLIP's token embeddings of ids: T(z) must then be what the stock pipeline makes."""
    a, b = decoder.text_encoder.encoders
    return torch.cat([a.get_input_embeddings()(ids), b.get_input_embeddings()(ids)], dim=-1)


def test_dir_is_read_as_its_family(tiny_sd3, decoder, stock):
    assert type(decoder) is SD3Decoder and type(DiffusionDecoder(stock)) is SD3Decoder
    assert check_sd_dir(tiny_sd3) == tiny_sd3
    assert decoder.text_dim == text_width(tiny_sd3) == 24 + 16 and text_length(tiny_sd3) == 77
    assert decoder.image_size == 32 and decoder.latent_scaling == (1.5035, 0.0609)
    assert not any(p.requires_grad for p in decoder.parameters()) and not decoder.train().training


def test_conditioning_of_token_embeddings_is_the_stock_encoding(decoder, stock):
    """z = token embeddings of a caption ending in EOS: prompt_embeds' CLIP positions, the zero T5 part and the
    pooled vectors equal the stock encode_prompt's (its pooled is read at EOS, ours at z's last position)."""
    caption = shapes.caption(shapes.scene_at(0, "train", 0))
    ids = tokenize(decoder.tokenizer, [caption])  # (1, 77)
    length = int((ids[0] == decoder.tokenizer.eos_token_id).nonzero()[0]) + 1
    with torch.no_grad():
        got = decoder.conditioning(_z_of_ids(decoder, ids[:, :length]))
        embeds, _, pooled, _ = stock.encode_prompt(caption, None, None, do_classifier_free_guidance=False)
    assert got["prompt_embeds"].shape == (1, length + T5_LENGTH, 48)
    torch.testing.assert_close(got["prompt_embeds"][:, :length], embeds[:, :length], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["prompt_embeds"][:, length:], embeds[:, 77:])  # zeros, T5 absent
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)
    assert torch.equal(decoder.encode_text_embeds(_z_of_ids(decoder, ids[:, :length])),
                       got["prompt_embeds"][:, :length, :40])  # c: the CLIP part, z's width


def test_unconditional_is_the_stock_empty_prompt_cut_to_z(decoder, stock):
    with torch.no_grad():
        _, neg, _, neg_pooled = stock.encode_prompt("", None, None, do_classifier_free_guidance=True,
                                                    negative_prompt="")
        got = decoder.unconditional(9)
    assert torch.equal(got["negative_prompt_embeds"], torch.cat([neg[:, :9], neg[:, 77:]], dim=1))
    assert torch.equal(got["negative_pooled_prompt_embeds"], neg_pooled)


def test_z_of_the_wrong_width_is_refused(decoder):
    with pytest.raises(ValueError, match="40"):
        decoder.conditioning(torch.zeros(1, 4, 32))


def test_loss_is_flow_matching_of_the_transformer(decoder):
    """Written out: latents (sample - shift) * scale, u = sigmoid(randn), sigma from the shifted schedule, the
    transformer on (1 - s) x0 + s eps against eps - x0, unweighted (logit_normal), mean."""
    torch.manual_seed(0)
    images, z = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 5, 40)
    with torch.no_grad():
        loss = decoder.loss(images, z, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        dist = decoder.vae.encode(images).latent_dist
        x0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g) - 0.0609) * 1.5035
        u = torch.sigmoid(torch.randn(3, generator=g))
        plain = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
        sigma_all = 3.0 * plain / (1 + 2.0 * plain)
        sigma = sigma_all[(u * 1000).long()].view(3, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        c = decoder.conditioning(z)
        pred = decoder.transformer(hidden_states=(1 - sigma) * x0 + sigma * eps, timestep=sigma.flatten() * 1000,
                                   encoder_hidden_states=c["prompt_embeds"],
                                   pooled_projections=c["pooled_prompt_embeds"]).sample
        want = ((pred - (eps - x0)) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert math.isfinite(loss.item())


def test_cached_posteriors_give_the_online_latents(decoder):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = decoder.vae.encode(images).latent_dist
        online = decoder.latents(images, torch.Generator().manual_seed(1))
    cached = decoder.posterior_latents(dist.mean, dist.std, torch.Generator().manual_seed(1))
    assert torch.equal(cached, online)


def test_gradients_reach_z_through_the_frozen_parts(decoder):
    z = torch.randn(2, 4, 40, requires_grad=True)
    decoder.loss(torch.randn(2, 4, 16, 16), z, torch.Generator().manual_seed(0)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_collapsed_t5_loss_is_the_stock_context_loss(tiny_sd3, checkpointing):
    """One zero T5 key counted 256 times is the stock 256 zero positions: the same loss and gradient into z (a
    dual-attention layer, whose image-only attn2 is handed the same kwargs, and qk-norm included)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    collapsed, full = SD3Decoder(pipe), SD3Decoder(copy.deepcopy(pipe), collapse_t5=False)
    seen = []
    full.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]),
                                               with_kwargs=True)
    grads, losses = [], []
    for decoder in (collapsed, full):
        if checkpointing:
            decoder.enable_gradient_checkpointing()
        z = torch.randn(3, 6, 40, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss = decoder.loss(torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2)), z,
                            torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss.detach())
        grads.append(z.grad)
    assert seen == [6 + T5_LENGTH]  # the reference ran the stock context
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_tail_biases_weigh_256_keys_exactly_in_the_attention_dtype(dtype):
    """Each bias survives the cast to the attention's dtype unchanged, and their weights sum to 256 (bf16 alone
    would round log 256 to 252.5 keys' weight)."""
    biases = tail_biases(T5_LENGTH, dtype)
    assert [float(torch.tensor(b).to(dtype)) for b in biases] == biases
    assert math.isclose(sum(math.exp(b) for b in biases), T5_LENGTH, rel_tol=1e-4)
    assert len(biases) == (1 if dtype == torch.float32 else 2)


def test_under_bf16_autocast_the_loss_carries_two_t5_keys(decoder):
    seen = []
    hook = decoder.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"].shape[1],
                                      kw["joint_attention_kwargs"]["attention_mask"][0, 0, 0, -3:].tolist())),
        with_kwargs=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            decoder.loss(torch.randn(1, 4, 16, 16), torch.randn(1, 6, 40), torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen == [(6 + 2, [0.0, *tail_biases(T5_LENGTH, torch.bfloat16)])]


def test_reconstruct_is_the_stock_pipeline(decoder, stock):
    """vlv's reconstruction equals the stock pipeline called with the same four embeddings and generator."""
    z = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(2))
    got = decoder.reconstruct(z, guidance_scale=2.0, steps=3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cond, uncond = decoder.conditioning(z), decoder.unconditional(6)
        want = stock(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                     negative_prompt_embeds=uncond["negative_prompt_embeds"].expand(2, -1, -1),
                     negative_pooled_prompt_embeds=uncond["negative_pooled_prompt_embeds"].expand(2, -1),
                     guidance_scale=2.0, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                     output_type="pt").images
    assert got.shape == (2, 3, 32, 32) and torch.equal(got, want)


def test_generate_is_the_stock_pipeline_on_captions(decoder, stock):
    """The teacher role (shapes evaluation draws the true and the predicted captions): the stock pipeline's own
    prompt path, its own scheduler, each chunk seeded by its offset."""
    captions = [shapes.caption(shapes.scene_at(i, "train", 0)) for i in range(3)]
    got = decoder.generate(captions, guidance_scale=2.0, steps=2, seed=5, batch_size=2)
    with torch.no_grad():
        want = [stock(prompt=captions[i : i + 2], guidance_scale=2.0, num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(5 + i)).images for i in (0, 2)]
    assert [im.size for im in got] == [(32, 32)] * 3
    want = to_pil(torch.cat(want) * 2 - 1)  # as PNG pixels
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))


def test_other_families_are_refused_in_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    with pytest.raises(InvalidInput, match="PixArt-Sigma"):
        DiffusionDecoder.from_pretrained(tmp_path)
