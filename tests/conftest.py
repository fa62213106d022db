import os

import pytest

# Tiny models: one thread per process beats two (thread overhead dominates; 2-core CI machine). Set before
# torch is imported (this file loads before any test module), so torch.get_num_threads() is 1 in every test and
# CLI and torchrun subprocesses inherit it; a value set outside is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def cli_run(capsys):
    """``cli_run(*args)`` -> a CompletedProcess-like (returncode, stdout, stderr) of vlv's main() in this process,
    as the console script runs it, argparse's exits (``--help``, a bad flag) included (an interpreter's start-up
    saved per call; tests/cli/test_output.py runs ``python -m vlv.cli`` itself)."""
    from types import SimpleNamespace

    from vlv.cli import main

    def run(*args) -> SimpleNamespace:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def cli(cli_run):
    """``cli(*args)`` -> (exit code, stderr) of :func:`cli_run`."""

    def run(*args) -> tuple[int, str]:
        r = cli_run(*args)
        return r.returncode, r.stderr

    return run


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from vlv.shapes.data import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    return {split: write_shapes(root / split, n=n, seed=0, split=split, progress=False)
            for split, n in (("train", 48), ("val", 6))}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, shapes_data):
    """A tiny shapes teacher trained for a few steps: real SD layout, seconds to build."""
    from vlv.shapes.config import TINY, teacher_recipe
    from vlv.shapes.teacher import train_teacher

    recipe = teacher_recipe(vae={"steps": 4, "batch_size": 8},
                            unet={"steps": 4, "batch_size": 8, "warmup_steps": 0, "eval_every": 0})
    out = train_teacher(shapes_data["train"], tmp_path_factory.mktemp("teacher") / "t", TINY, recipe, progress=False)
    assert out is not None
    return out


def build_tiny_sd3(out):
    """A random-init StableDiffusion3Pipeline dir in diffusers' own test-config sizes (two CLIPs of different
    widths so z's split shows, a VAE with shift_factor, a dual-attention layer and qk-norm, no T5), with the shapes
    world's local tokenizer."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from vlv.shapes.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(77)

    def clip(hidden, layers, heads):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=16, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=48, pooled_projection_dim=32, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")  # SD 3.5 Medium's kinds
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(24, 3, 4), tokenizer=tok, text_encoder_2=clip(16, 2, 2),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3-layout dir (random init): z is 24 + 16 = 40 wide, images 32 px."""
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def build_tiny_sdxl(out, force_zeros_for_empty_prompt=True):
    """A random-init StableDiffusionXLPipeline dir in diffusers' own test-config sizes (a CLIPTextModel and a
    CLIPTextModelWithProjection of different widths, the UNet's text_time added conditions), shapes tokenizer."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from vlv.shapes.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(77)

    def config(hidden, layers, heads):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                              num_attention_heads=heads, max_position_embeddings=77, projection_dim=16,
                              hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 16,
                                cross_attention_dim=24 + 16, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config(24, 3, 4)),
                                     text_encoder_2=CLIPTextModelWithProjection(config(16, 2, 2)), tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=scheduler, add_watermarker=False,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-layout dir (random init): z is 24 + 16 = 40 wide, images 32 px."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_no_zeros(tmp_path_factory):
    """The same tiny SDXL with force_zeros_for_empty_prompt off: its negative branch is "" through both CLIPs."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-no-zeros", force_zeros_for_empty_prompt=False)


def build_tiny_flux(out, guidance_embeds=True):
    """A random-init FluxPipeline dir in diffusers' own test-config sizes (CLIP + a local T5Config, a VAE with
    shift_factor whose 4 latent channels the transformer takes packed 2x2), shapes tokenizer for both."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from vlv.shapes.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(77)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=24, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny FLUX.1-dev-layout dir (random init, guidance embedded): z is 24 + 32 = 56 wide."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")
