import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from vlv.data.images import to_tensor
from vlv.decoder import DiffusionDecoder, compose
from vlv.diffusion import make_pipeline, random_pipeline, tokenize
from vlv.encoder import EncoderConfig, VLVEncoder
from vlv.shapes import world as shapes
from vlv.shapes.config import TINY
from vlv.shapes.teacher import build_scheduler, build_text_encoder, build_unet, build_vae, save_teacher
from vlv.shapes.tokenizers import build_tokenizer

NQ = 12


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = build_tokenizer(TINY.max_length)
    pipe = make_pipeline(build_vae(TINY), build_text_encoder(TINY, tok), tok, build_unet(TINY), build_scheduler(TINY))
    return save_teacher(pipe, tmp_path_factory.mktemp("teacher") / "tiny", TINY)


@pytest.fixture()
def decoder(teacher_dir):
    return DiffusionDecoder.from_pretrained(teacher_dir)


def _encoder(decoder, trainable=("queries", "phi", "florence.model.language_model")) -> VLVEncoder:
    torch.manual_seed(0)
    return VLVEncoder(EncoderConfig.named("shapes", text_dim=decoder.text_dim, num_queries=NQ,
                                           trainable=list(trainable)))


def _ids(decoder, n=3):
    captions = [shapes.caption(shapes.scene_at(0, "train", i)) for i in range(n)]
    return tokenize(decoder.tokenizer, captions)  # (n, 77)


def test_clip_from_embeddings_equals_clip_from_ids(decoder):
    te = decoder.text_encoder
    for ids in (_ids(decoder), _ids(decoder)[:, :NQ], _ids(decoder, 1)[:, :5]):
        z = te.embeddings.token_embedding(ids)  # (B, L, d_T)
        with torch.no_grad():
            assert torch.equal(decoder.encode_text_embeds(z), te(ids).last_hidden_state)


def test_loss_is_the_paper_loss(decoder):
    """Latents, t, noise drawn from the generator in that order; the scheduler's own target; plain MSE."""
    images = torch.rand(3, 3, 64, 64) * 2 - 1  # odd batch
    ids = _ids(decoder)[:, :NQ]
    z = decoder.text_encoder.embeddings.token_embedding(ids)
    with torch.no_grad():
        loss = decoder.loss(images, z, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        latents = decoder.vae.encode(images).latent_dist.sample(g) * decoder.vae.config.scaling_factor
        t = torch.randint(0, 1000, (3,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        sched = decoder.scheduler
        target = sched.get_velocity(latents, noise, t)  # the tiny teacher is v-prediction
        pred = decoder.unet(sched.add_noise(latents, noise, t), t,
                            encoder_hidden_states=decoder.text_encoder(ids).last_hidden_state).sample
        assert torch.equal(loss, F.mse_loss(pred, target))
        # Pre-computed latents give the same loss when drawn from the same generator.
        g = torch.Generator().manual_seed(0)
        assert torch.equal(decoder.loss(decoder.latents(images, g), z, g), loss)


def test_gradients_reach_the_queries_through_frozen_unet_and_clip(decoder):
    enc = _encoder(decoder)
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    loss = decoder.loss(to_tensor(pixels.numpy()), enc(enc.transform.pixels(pixels)), torch.Generator().manual_seed(0))
    loss.backward()
    assert enc.queries.grad is not None and enc.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.parameters())
    assert all(not p.requires_grad for p in decoder.parameters())


def test_optimizer_step_moves_only_the_trainable_parameters(decoder):
    enc = _encoder(decoder).train()
    frozen = {f"decoder.{n}": p for n, p in decoder.named_parameters()}
    frozen |= {n: p for n, p in enc.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoder.unet.") for n in frozen) and any(n.startswith("decoder.vae.") for n in frozen)
    assert any(n.startswith("decoder.text_encoder.") for n in frozen)
    assert any(n.startswith("florence.model.vision_tower.") for n in frozen)
    before = {n: p.detach().clone() for n, p in (frozen | trainable).items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)  # no decay: only gradients move
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    z = enc(enc.transform.pixels(pixels))
    decoder.loss(to_tensor(pixels.numpy()), z, torch.Generator().manual_seed(0)).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())
    unmoved = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unmoved


def test_reconstruct_is_the_stock_pipeline(decoder, teacher_dir):
    z = torch.randn(3, NQ, decoder.text_dim)  # odd batch
    out = decoder.reconstruct(z, guidance_scale=2.0, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 64, 64)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    empty = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        cond = decoder.encode_text_embeds(z)
        uncond = pipe.text_encoder(empty).last_hidden_state[:, :NQ].expand(3, -1, -1)
    by_hand = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=2.0, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(out, by_hand)
    fast = decoder.pipeline("fast")
    assert isinstance(fast.scheduler, DPMSolverMultistepScheduler)
    out = decoder.reconstruct(z[:1], steps=2, sampler="fast", generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        decoder.reconstruct(z, sampler="ddim")


def test_compose(decoder):
    a, b = torch.randn(2, NQ, 8), torch.randn(2, NQ, 8)
    c = compose(a, b, 4)
    assert c.shape == (2, 8, 8) and torch.equal(c[:, :4], a[:, :4]) and torch.equal(c[:, 4:], b[:, :4])
    with pytest.raises(ValueError):
        compose(a, b, NQ + 1)
    z = compose(torch.randn(1, NQ, decoder.text_dim), torch.randn(1, NQ, decoder.text_dim), 3)
    assert decoder.reconstruct(z, steps=1, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 64, 64)


def test_decoder_stays_frozen_and_in_eval(decoder):
    decoder.train()
    assert not decoder.training and not decoder.unet.training
    with pytest.raises(FileNotFoundError):
        DiffusionDecoder.from_pretrained("/nonexistent/sd")


def test_sd21_base_random_init_from_shipped_configs():
    with torch.device("meta"):
        pipe = random_pipeline(build_tokenizer(), "sd21-base")
    assert 865e6 < sum(p.numel() for p in pipe.unet.parameters()) < 867e6  # ~865.9 M
    assert pipe.text_encoder.config.num_hidden_layers == 23 and pipe.text_encoder.config.hidden_size == 1024
    assert pipe.unet.config.cross_attention_dim == 1024 and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.scaling_factor == 0.18215  # diffusers' default: SD 2.1's vae config has no key
