"""The paper recipes, built on the real architectures without weights (meta device), so what a full-scale run
depends on cannot rot unseen: the recipe resolves, what trains (counted from the configs by hand), in which dtype
and mode each part runs, and the image sizes that reach the encoder and the VAE. Seconds, no memory."""

import pytest
import torch

from vlv.config import read_config
from vlv.data.transforms import vae_range_pixels
from vlv.diffusion import random_pipeline
from vlv.encoder import VLVEncoder
from vlv.shapes.tokenizers import build_shapes_tokenizer, build_tokenizer
from vlv.training.config import Stage1Settings, Stage2Settings
from vlv.training.recipes import load_sections
from vlv.training.stage1 import data_size, encoder_config, frozen_decoder
from vlv.training.stage2 import assemble_captioner


def _bart_params(text: dict) -> int:
    """BartModel (Florence-2's language model) from its config: shared embedding, learned positions (offset 2) and
    embedding LayerNorm per side, encoder layers (self-attn, 2 LN, FFN), decoder layers (+ cross-attn, + LN)."""
    d, f, v, p = text["d_model"], text["encoder_ffn_dim"], text["vocab_size"], text["max_position_embeddings"]
    attn, ln, ffn = 4 * (d * d + d), 2 * d, d * f + f + f * d + d
    encoder_layer = attn + ffn + 2 * ln
    decoder_layer = 2 * attn + ffn + 3 * ln
    return (v * d + 2 * ((p + 2) * d + ln) + text["encoder_layers"] * encoder_layer
            + text["decoder_layers"] * decoder_layer)


def _qwen2_params(c: dict) -> int:
    """Qwen2ForCausalLM with tied embeddings: q/k/v with bias, o without, SwiGLU MLP, two RMSNorms a layer."""
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c[
        "num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert c["tie_word_embeddings"]
    return c["vocab_size"] * h + c["num_hidden_layers"] * layer + h


@pytest.fixture(scope="module")
def stage1():
    recipe, settings, cfg = load_sections("paper", "stage1", Stage1Settings, {"decoder": "sd21-base/", "data": "x"})
    text_dim = read_config("sd21-base-text_encoder")["hidden_size"]
    with torch.device("meta"):
        encoder = VLVEncoder(encoder_config(settings, text_dim))
        decoder = frozen_decoder(random_pipeline(build_tokenizer(), "sd21-base"), settings)
    return settings, cfg, encoder, decoder


def test_paper_stage1_is_the_official_run(stage1):
    settings, cfg, encoder, decoder = stage1
    # The official train_stage1.sh: 384 px, fp32, no warm-up, a global batch of 512 on 8 GPUs, UNet checkpointing.
    assert (settings.image_size, cfg.mixed_precision, cfg.warmup_steps, cfg.batch_size * cfg.grad_accum * 8) == (
        384, "no", 0, 512)
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.grad_clip) == (5e-5, (0.9, 0.99), 0.01, 1.0)
    assert decoder.unet.is_gradient_checkpointing
    # What trains: the queries, phi and Florence-2-large's BART (the official set), nothing of the DaViT.
    text = read_config("florence2-large")["text_config"]
    d, nq, d_t = text["d_model"], settings.num_queries, encoder.config.text_dim
    want = nq * d + (d * d + d) + (d * d_t + d_t) + _bart_params(text)
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == want
    assert not any(p.requires_grad for p in decoder.parameters())
    assert {p.dtype for p in [*encoder.parameters(), *decoder.parameters()]} == {torch.float32}  # the paper's fp32
    # Modes, as the loop sets them: the BART trains in train mode (dropout 0.1), the frozen parts stay in eval.
    encoder.train()
    decoder.train()
    lm, florence = encoder.florence.model.language_model, encoder.florence.model
    assert all(m.training for m in lm.modules()) and lm.config.dropout > 0
    assert not any(m.training for m in [*florence.vision_tower.modules(), *florence.multi_modal_projector.modules()])
    assert not any(m.training for m in decoder.modules())
    # Sizes: data at 384 px, the VAE's 48 x 48 latents, the encoder's 768 px and 577 visual tokens.
    size = data_size(settings, decoder)
    images = torch.empty(2, 3, size, size, device="meta")
    with torch.no_grad():
        assert decoder.vae.encode(images).latent_dist.mean.shape == (2, 4, 48, 48)
        t = encoder.transform  # its second stage, on the VAE-range tensor training decodes
        pixels = vae_range_pixels(images, t.size, t.mean, t.std)
        assert pixels.shape == (2, 3, 768, 768)
        assert encoder.image_features(pixels).shape == (2, 577, d)


def test_paper_stage2_shards_the_llm_and_trains_what_the_official_code_trains(stage1):
    s1, _, encoder, decoder = stage1
    recipe, settings, cfg = load_sections("paper", "stage2", Stage2Settings,
                                          {"encoder": "runs/s1", "lm": "qwen2.5-3b", "data": "x"})
    assert (cfg.sharding, cfg.mixed_precision, cfg.warmup_steps, cfg.batch_size * 8) == ("fsdp2", "bf16", 0, 64)
    assert cfg.checkpoint_every >= 1000 and cfg.checkpoint_minutes >= 15  # tens of GB a checkpoint
    assert settings.image_size == s1.image_size == 384 and settings.gradient_checkpointing
    with torch.device("meta"):
        cap = assemble_captioner(settings, decoder.text_encoder, encoder, seed=0, tokenizer=build_shapes_tokenizer())
    # What trains: psi, all of Qwen2.5-3B and the encoder's BART; queries, phi, the DaViT and T stay frozen.
    qwen, text = read_config("qwen2.5-3b"), read_config("florence2-large")["text_config"]
    d_t, d_lm = encoder.config.text_dim, qwen["hidden_size"]
    psi = d_t * d_lm + d_lm + d_lm * d_lm + d_lm
    trainable = sum(p.numel() for p in cap.parameters() if p.requires_grad)
    assert trainable == psi + _qwen2_params(qwen) + _bart_params(text)
    assert 3.4e9 < trainable < 3.6e9  # about 56 GB of fp32 weights, grads and AdamW state: FSDP2's to shard
    assert {p.dtype for p in cap.parameters()} == {torch.float32}  # fp32 master weights under bf16 autocast
    cap.train()
    layers = cap.lm.model.layers
    assert all(layer.training and layer.gradient_checkpointing for layer in layers)  # recomputed in backward
    assert all(m.training for m in cap.encoder.florence.model.language_model.modules())
    frozen = [*cap.text_encoder.modules(), *cap.encoder.florence.model.vision_tower.modules()]
    assert not any(m.training for m in frozen)
    images = torch.empty(2, 3, settings.image_size, settings.image_size, device="meta")
    t = cap.encoder.transform
    assert vae_range_pixels(images, t.size, t.mean, t.std).shape == (2, 3, 768, 768)
