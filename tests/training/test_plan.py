"""vlv plan: the paper's architectures without weights, and what a step of a run holds, known before it loads."""

import pytest
import torch

from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.recipes import load_recipe, load_sections, section


def _n(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def test_the_paper_architectures_build_without_weights_at_their_published_sizes():
    from vlv.training.plan import meta_decoder, meta_encoder, meta_lm, meta_stage2_encoder, meta_text_encoder
    from vlv.training.stage1 import encoder_config

    _, s1, _ = load_sections("paper", "stage1", Stage1Settings, {"decoder": "sd21-base", "data": ""})
    decoder = meta_decoder("sd21-base")
    encoder = meta_encoder(encoder_config(s1, decoder.text_dim))
    lm = meta_lm("qwen2.5-3b")
    for m in (decoder, encoder, lm):
        assert all(p.is_meta for p in m.parameters())  # no weights were made
    # SD 2.1-base's UNet 865.9 M (its model card), Florence-2-large 0.77 B, Qwen2.5-3B 3.09 B with tied embeddings
    assert _n(decoder.unet) == pytest.approx(865.9e6, rel=1e-3)
    assert _n(encoder.florence) == pytest.approx(0.77e9, rel=0.01)
    assert _n(lm) == pytest.approx(3.09e9, rel=0.01)
    # the official stage-1 set: the queries, phi and Florence's BART (with its shared embeddings); the DaViT frozen
    bart = _n(encoder.florence.model.language_model)
    assert _n(encoder, trainable=True) == bart + _n(encoder.phi) + encoder.queries.numel()
    # stage 2 reads a stage-1 encoder as stage1/paper trains it, and T from the same decoder
    assert _n(meta_stage2_encoder("florence2-large", decoder.text_dim), True) == _n(encoder, True)
    assert _n(meta_text_encoder("sd21-base")) == _n(decoder.text_encoder)


def _shapes_stage2(sharding: str, processes: int = 8):
    """stage2/paper's sections on the shapes architectures (a full-scale step takes a minute of CPU)."""
    from vlv.shapes.tokenizers import build_shapes_tokenizer
    from vlv.training.plan import plan_stage2

    recipe = load_recipe("paper", "stage2")
    settings = section(recipe, "settings", Stage2Settings, {"gradient_checkpointing": False},
                       decoder="shapes-teacher", encoder="shapes-stage1", lm="qwen2-shapes", data="")
    cfg = section(recipe, "train", TrainConfig, {"sharding": sharding, "batch_size": 2})
    return plan_stage2(settings, cfg, processes, samples=1000, tokenizer=build_shapes_tokenizer(), caption_tokens=16)


def test_sharding_over_8_processes_holds_an_eighth_of_the_training_state():
    ddp, fsdp2 = _shapes_stage2("ddp"), _shapes_stage2("fsdp2")
    assert fsdp2.memory.peak < ddp.memory.peak
    assert fsdp2.memory.optimizer == pytest.approx(ddp.memory.optimizer / 8, rel=0.1)  # dim-0 shards, padded
    assert ddp.memory.buckets == ddp.weights_bytes > 0  # one more copy of the fp32 gradients
    assert fsdp2.memory.buckets == 0 and fsdp2.checkpoint_bytes == ddp.checkpoint_bytes  # all ranks together
    assert ddp.global_batch == 16 and ddp.trainable == fsdp2.trainable
    assert "fits a 40 GiB GPU" in fsdp2.lines(40)[-1] and "does NOT fit a 0.01 GiB GPU" in ddp.lines(0.01)[-1]


def test_the_estimate_is_the_memory_a_real_step_holds():
    """The plan on fake tensors against the same MemTracker on a real step of the same modules (gradient
    checkpointing on: a FLOP counter's module hooks once kept its recomputed activations alive)."""
    from vlv.diffusion import pipeline_from_configs
    from vlv.encoder import VLVEncoder
    from vlv.training.plan import _StepMemory, decoder_configs, plan_stage1_models
    from vlv.training.stage1 import encoder_config, stage1_loss

    settings = Stage1Settings(decoder="shapes-teacher", data="", encoder="shapes", gradient_checkpointing=True)
    cfg = TrainConfig(batch_size=8)

    def build():
        from vlv.decoder import DiffusionDecoder

        torch.manual_seed(0)
        decoder = DiffusionDecoder(pipeline_from_configs(decoder_configs("shapes-teacher")))
        return VLVEncoder(encoder_config(settings, decoder.text_dim)), decoder

    with torch.device("meta"):
        encoder, decoder = build()
    plan = plan_stage1_models(encoder, decoder, settings, cfg, target="cpu")
    encoder, decoder = build()
    decoder.unet.enable_gradient_checkpointing()
    encoder.train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = _StepMemory()
    tracker.track_external(encoder, decoder, opt)
    with tracker:
        latent = (8, 4, 16, 16)
        batch = {"pixel_values": torch.randn(8, 3, 64, 64), "mean": torch.randn(latent), "std": torch.rand(latent)}
        stage1_loss(decoder, encoder, batch, None).mean.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    real = sum(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
    # transformers builds explicit attention masks on fake tensors (it cannot read that a mask is all ones and skip
    # it, as a real step does): a few MB here, a rounding error at full scale
    assert real <= plan.memory.peak <= 1.05 * real
    assert plan.flops_per_sample > 0 and [c.kind for c in plan.caches] == ["latents"]


def test_a_run_that_does_not_fit_stops_in_one_line_before_anything_loads(shapes_data, tmp_path, capsys):
    from vlv.cli import main

    run = tmp_path / "run"
    assert main(["train", "stage1", "--decoder", "shapes-teacher", "--data", str(shapes_data["train"]), "--out",
                 str(run), "--gpu-memory", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage1/shapes does not fit the GPU: a step at batch" in err[0]
    assert "more than 90% of 0.01 GiB; try a smaller --batch-size" in err[0]
    assert not run.exists()  # refused before the run dir, a model or a cache was made


def test_without_a_gpu_nothing_is_planned(monkeypatch):
    from vlv.training.plan import check_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_memory(lambda: pytest.fail("planned"), None) is None


def test_cli_plan_says_what_a_recipe_costs_and_refuses_what_does_not_fit(capsys):
    from vlv.cli import main

    assert main(["plan", "--recipe", "stage2/shapes", "--decoder", "shapes-teacher", "--encoder", "shapes-stage1",
                 "--lm", "qwen2-shapes", "--batch-size", "2", "--caption-tokens", "8", "--gpu-memory", "0.01"]) == 2
    out, err = capsys.readouterr()
    assert "global batch 2 = 2 per process" in out and "cache text_embeds" not in out  # the encoder trains
    assert "does NOT fit a 0.01 GiB GPU" in out  # the plan, then the refusal
    assert len(err.strip().splitlines()) == 1 and err.startswith("vlv: error: stage2/shapes does not fit the GPU")
    assert main(["plan", "--recipe", "paper"]) == 2
    assert "name it stage1/paper or stage2/paper" in capsys.readouterr().err
    assert main(["plan", "--recipe", "stage1/shapes", "--lm", "qwen2-shapes"]) == 2
    assert "--lm is a stage2 setting" in capsys.readouterr().err


def test_a_gpu_plan_runs_attention_as_a_gpu_does():
    """With attention dropout a CPU falls back to the math path (it holds the L x L probabilities); a GPU plan
    runs the memory-efficient kernel a GPU runs, and puts torch's function back."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from vlv.training.plan import _gpu_attention, _StepMemory

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def peak(gpu: bool) -> tuple[torch.Size, int]:
        with FakeTensorMode():
            q = torch.empty(4, 8, 256, 32, requires_grad=True)
            tracker = _StepMemory()
            with _gpu_attention() if gpu else contextlib.nullcontext(), tracker:
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
                out.sum().backward()
        return out.shape, sum(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())

    (cpu_shape, cpu), (gpu_shape, gpu) = peak(False), peak(True)
    assert cpu_shape == gpu_shape and gpu < cpu / 3
    assert torch.nn.functional.scaled_dot_product_attention is sdpa


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage1/paper"])  # stage2/paper fits with room (test_paper_recipes holds its fsdp2)
def test_the_paper_recipes_as_shipped_fit_8_gpus_of_80_gb(name):
    """The recipes cannot drift into a run that stops on its first step (a full-scale plan: 20-40 s of CPU)."""
    from vlv.shapes.tokenizers import build_shapes_tokenizer
    from vlv.training.plan import plan_recipe

    plan = plan_recipe(name, processes=8, tokenizer=build_shapes_tokenizer())  # a random-init Qwen brings none
    assert plan.fits(80), plan.lines(80)
    assert plan.global_batch == {"stage1/paper": 512, "stage2/paper": 64}[name]
