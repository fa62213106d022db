"""Stage 2's cache of c = T(E(x)): at the levels that freeze the encoder a step reads cached rows instead of
running E and T on decoded images, and trains the same weights bit for bit."""

import pytest
import torch
from accelerate import PartialState
from safetensors.torch import load_file

from vlv.data.caches import Cache, text_embeds_key
from vlv.data.datasets import FolderDataset
from vlv.errors import InvalidInput
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.text_encoder import load_text_encoder
from vlv.training.caches import build_cache
from vlv.training.config import Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.stage1 import build_encoder
from vlv.training.stage2 import (
    Stage2Task,
    build_captioner,
    precompute_text_embeds,
    prepare_stage2,
    train_stage2,
)

CPU = torch.device("cpu")


def _stage1_dir(teacher, data, out, seed=0):
    """An untrained shapes encoder (Nq = 8) saved as a stage-1 run: stage 2 reads it like a finished one."""
    settings = Stage1Settings(decoder=str(teacher), data=str(data), encoder="shapes", num_queries=8)
    width = load_text_encoder(teacher).config.hidden_size
    return build_encoder(settings, width, seed=seed).save_pretrained(out)


@pytest.fixture(scope="module")
def stage1_dir(tiny_teacher, shapes_data, tmp_path_factory):
    return _stage1_dir(tiny_teacher, shapes_data["train"], tmp_path_factory.mktemp("stage1") / "run")


def _settings(teacher, stage1, data, **kw):
    return Stage2Settings(decoder=str(teacher), encoder=str(stage1), lm="shapes-lm", data=str(data),
                          **{"trainable": "mlp+llm", "max_new_tokens": 40, "num_workers": 0, **kw})


def _cfg(**kw):
    return TrainConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False, **kw})


def _trained(run):
    return load_file(run / "captioner.safetensors")


def test_cached_rows_give_the_step_the_same_loss_and_gradients(tiny_teacher, stage1_dir, shapes_data, tmp_path):
    """Rows computed at the step's batch size are the bits the step computes (fp32), so loss and every gradient
    are equal, not just close."""
    settings = _settings(tiny_teacher, stage1_dir, shapes_data["train"])
    cap = build_captioner(settings, 0, build_shapes_tokenizer()).train()
    data, size = FolderDataset(shapes_data["train"]), cap.encoder.config.image_size
    build_cache("text_embeds", tmp_path / "c", data, size, PartialState(), encoder=cap.encoder,
                text_encoder=cap.text_encoder, batch_size=4, shard_rows=20, progress=False)
    cache = Cache(tmp_path / "c", want=text_embeds_key(cap.encoder, cap.text_encoder, data, size))
    rows = cache[[0, 47]]["text_embeds"]
    assert rows.dtype == torch.float32 and rows.shape == (2, 8, cap.config.text_dim)
    pixels, cached = Stage2Task(cap, data), Stage2Task(cap, data, text_embeds=cache)
    for step in range(3):
        got = []
        for task in (pixels, cached):
            batch = task.batch(step, 0, 4, CPU)
            cap.zero_grad(set_to_none=True)
            loss = task.loss(cap, batch, None).mean
            loss.backward()
            got.append((loss.detach(), {n: p.grad.clone() for n, p in cap.named_parameters() if p.grad is not None}))
        assert "images" not in batch  # the cached step never decodes an image
        (loss_a, grads_a), (loss_b, grads_b) = got
        assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    cap(**cap.tokenize(["a red circle"]), text_embeds=rows[:1])  # the encoder is frozen: c may skip it
    cap.encoder.phi[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trains at this level"):
        cap(**cap.tokenize(["a red circle"]), text_embeds=rows[:1])


def test_a_cached_run_trains_the_weights_of_an_uncached_one_and_resumes_exactly(tiny_teacher, stage1_dir,
                                                                               shapes_data, tmp_path):
    settings = _settings(tiny_teacher, stage1_dir, shapes_data["train"])
    assert settings.caches_text_embeds  # on by default at mlp+llm
    assert train_stage2(settings, _cfg(), tmp_path / "cached") is not None
    assert (tmp_path / "cached" / "text_embeds" / "00000.safetensors").is_file()
    train_stage2(Stage2Settings(**{**vars(settings), "cache_text_embeds": False}), _cfg(), tmp_path / "pixels")
    assert not (tmp_path / "pixels" / "text_embeds").exists()
    assert train_stage2(settings, _cfg(stop_after=1), tmp_path / "resumed") is None
    assert train_stage2(settings, _cfg(), tmp_path / "resumed") is not None
    given = Stage2Settings(**{**vars(settings), "text_embeds_cache": str(tmp_path / "cached" / "text_embeds")})
    train_stage2(given, _cfg(), tmp_path / "given")
    assert not (tmp_path / "given" / "text_embeds").exists()
    precompute_text_embeds(settings.decoder, settings.encoder, settings.data, tmp_path / "ahead", batch_size=4,
                           num_workers=0, progress=False)
    ahead = Stage2Settings(**{**vars(settings), "text_embeds_cache": str(tmp_path / "ahead")})
    train_stage2(ahead, _cfg(), tmp_path / "precomputed")
    want = _trained(tmp_path / "cached")
    for run in ("pixels", "resumed", "given", "precomputed"):
        got = _trained(tmp_path / run)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), run


def test_a_cache_of_another_encoder_is_refused(tiny_teacher, stage1_dir, shapes_data, tmp_path):
    settings = _settings(tiny_teacher, stage1_dir, shapes_data["train"])
    cap = build_captioner(settings, 0, build_shapes_tokenizer())
    data = FolderDataset(shapes_data["train"])
    build_cache("text_embeds", tmp_path / "c", data, cap.encoder.config.image_size, PartialState(),
                encoder=cap.encoder, text_encoder=cap.text_encoder, batch_size=4, progress=False)
    other = _stage1_dir(tiny_teacher, shapes_data["train"], tmp_path / "other", seed=1)
    given = _settings(tiny_teacher, other, shapes_data["train"], text_embeds_cache=str(tmp_path / "c"))
    with pytest.raises(InvalidInput, match="text_embeds cache was made from other inputs.*weights"):
        train_stage2(given, _cfg(), tmp_path / "run")


def test_level_mlp_llm_encoder_reads_images_and_refuses_a_cache(tiny_teacher, stage1_dir, shapes_data, tmp_path):
    data = shapes_data["train"]
    assert not _settings(tiny_teacher, stage1_dir, data, trainable="mlp+llm+encoder").caches_text_embeds
    assert _settings(tiny_teacher, stage1_dir, data, trainable="mlp").caches_text_embeds
    assert not _settings(tiny_teacher, stage1_dir, data, cache_text_embeds=False).caches_text_embeds
    for kw, flag in (({"cache_text_embeds": True}, "--cache-text-embeds"),
                     ({"text_embeds_cache": str(tmp_path)}, "--text-embeds-cache")):
        with pytest.raises(InvalidInput, match=f"{flag}: at level mlp\\+llm\\+encoder the encoder trains"):
            prepare_stage2(_settings(tiny_teacher, stage1_dir, data, trainable="mlp+llm+encoder", **kw), _cfg(),
                           tmp_path / "run")
    with pytest.raises(InvalidInput, match="pass one or the other"):
        prepare_stage2(_settings(tiny_teacher, stage1_dir, data, cache_text_embeds=False, text_embeds_cache="x"),
                       _cfg(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    settings = _settings(tiny_teacher, stage1_dir, data, trainable="mlp+llm+encoder")
    cap = build_captioner(settings, 0, build_shapes_tokenizer())
    with pytest.raises(ValueError, match="encoder trains at this level"):
        Stage2Task(cap, FolderDataset(data), text_embeds=object())
