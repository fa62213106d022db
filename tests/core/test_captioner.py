import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlv.captioner import Captioner, CaptionerConfig
from vlv.data.datasets import InMemory
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.lm import lm_config
from vlv.shapes import world as shapes
from vlv.shapes.metrics import lm_judge, stage2_evaluator
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.text_encoder import load_text_encoder
from vlv.training.config import LMSettings, Stage1Settings, Stage2Settings, TrainConfig
from vlv.training.lm import train_lm
from vlv.training.loop import train
from vlv.training.stage1 import build_encoder
from vlv.training.stage2 import Stage2Task, train_stage2

# A 1-layer Qwen2 over the shapes tokenizer (336 tokens): milliseconds per step.
TINY_LM = dict(model_type="qwen2", vocab_size=336, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
CAPTIONS = ["a small red circle at the top left",
            "a large blue square at the top right, a small cyan triangle at the bottom left and a large green "
            "circle at the bottom right"]


@pytest.fixture(scope="module")
def text_encoder(tiny_teacher):
    return load_text_encoder(tiny_teacher)


@pytest.fixture(scope="module")
def stage1_dir(tiny_teacher, shapes_data, text_encoder, tmp_path_factory):
    """A stage-1 encoder dir (untrained shapes preset, Nq = 8): stage 2 reads it like a finished stage-1 run."""
    settings = Stage1Settings(decoder=str(tiny_teacher), data=str(shapes_data["train"]), encoder="shapes",
                              num_queries=8)
    encoder = build_encoder(settings, text_encoder.config.hidden_size, seed=0)
    return encoder.save_pretrained(tmp_path_factory.mktemp("stage1") / "run")


@pytest.fixture(scope="module")
def lm_dir(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "lm"
    lm = train_lm(LMSettings(data=str(shapes_data["train"]), val=str(shapes_data["val"])),
                  TrainConfig(steps=3, batch_size=4, lr=1e-3, eval_every=3, progress=False), out,
                  tokenizer=build_shapes_tokenizer(), judge=lm_judge)
    assert lm is not None
    return out


def _captioner(text_encoder, trainable="mlp", encoder=None, **kw):
    torch.manual_seed(0)
    config = CaptionerConfig(text_dim=text_encoder.config.hidden_size, lm=TINY_LM, trainable=trainable, **kw)
    return Captioner(config, text_encoder, encoder, tokenizer=build_shapes_tokenizer())


def _z(b=2, nq=8, d=None, text_encoder=None):
    return torch.randn(b, nq, d or text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------- tokenizer
def test_lm_tokenizer_round_trips_captions_and_matches_the_preset(tmp_path):
    tok = build_shapes_tokenizer()
    rng = np.random.default_rng(0)
    captions = [shapes.caption(shapes.sample_scene(rng)) for _ in range(300)]
    assert any(", " in c for c in captions)
    for c in captions:
        ids = tok(c).input_ids
        assert len(ids) == len(c.replace(",", " ,").split())  # one token per word and per comma, no specials
        assert tok.decode(ids) == c
    assert tok.decode(tok("Any text: 3 ünïcode words!").input_ids) == "Any text: 3 ünïcode words!"  # byte-level
    cfg = lm_config("qwen2-shapes")
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
        len(tok), tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert all(again.decode(again(c).input_ids) == c for c in captions[:20])
    assert again(captions[0]).input_ids == tok(captions[0]).input_ids


def test_full_scale_preset_is_qwen25_3b():
    cfg = lm_config("qwen2.5-3b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (2048, 36, 2, 151936)
    assert cfg.tie_word_embeddings and cfg.eos_token_id == 151643 and cfg.rope_parameters["rope_theta"] == 1e6


def test_config_is_validated(text_encoder):
    with pytest.raises(ValueError, match="LoRA"):
        CaptionerConfig(text_dim=32, trainable="mlp", lora_rank=4)
    with pytest.raises(ValueError, match="trainable"):
        CaptionerConfig(text_dim=32, trainable="llm")
    with pytest.raises(ValueError, match="encoder"):
        _captioner(text_encoder, trainable="mlp+llm+encoder")


# --------------------------------------------------------------------------------------------- loss
def test_loss_is_shifted_cross_entropy_on_caption_and_eos_only(tiny_teacher, text_encoder):
    cap = _captioner(text_encoder).eval()
    z = _z(text_encoder=text_encoder)
    batch = cap.tokenize(CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    with torch.no_grad():
        loss = cap(z=z, **batch).loss
        # By hand: c = T(z) (the decoder's own T), e = psi(c), full logits, position Nq-1+j predicts token j.
        c = DiffusionDecoder.from_pretrained(tiny_teacher).encode_text_embeds(z)
        assert torch.allclose(c, cap.encode_text_embeds(z), atol=1e-6)
        e = cap.psi(c)
        embeds = torch.cat([e, cap.lm.get_input_embeddings()(ids)], dim=1)
        logits = cap.lm(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 8, dtype=torch.long), mask],
                                                                       1)).logits
        nll, count = 0.0, 0
        for i, caption in enumerate(CAPTIONS):
            target = torch.tensor(cap.tokenizer(caption).input_ids + [cap.eos_token_id])  # caption + EOS
            pred = logits[i, 8 - 1 : 8 - 1 + len(target)]
            nll += F.cross_entropy(pred, target, reduction="sum")
            count += len(target)
        assert torch.allclose(loss, nll / count, atol=1e-5)
        # Padding is ignored by the mask, whatever its id: pad with EOS (Qwen's pad == eos) and nothing changes.
        as_eos = ids.masked_fill(mask == 0, cap.eos_token_id)
        assert torch.allclose(cap(z=z, input_ids=as_eos, attention_mask=mask).loss, loss, atol=1e-6)


# --------------------------------------------------------------------------------------- generation
def test_generation_stops_at_eos_when_forced(text_encoder):
    cap = _captioner(text_encoder).eval()
    d, v = cap.lm.config.hidden_size, cap.lm.config.vocab_size
    head = torch.nn.Linear(d, v)  # the LM can only say EOS
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()[cap.eos_token_id] = 10.0
    cap.lm.lm_head = head
    z = _z(3, text_encoder=text_encoder)
    for beams in (1, 4):
        ids = cap.generate_ids(z=z, num_beams=beams, max_new_tokens=20)
        assert ids.tolist() == [[cap.eos_token_id]] * 3
        assert cap.generate(z=z, num_beams=beams, max_new_tokens=20) == [""] * 3


def test_trained_captioner_says_its_caption_and_stops(text_encoder):
    cap = _captioner(text_encoder, trainable="mlp+llm", max_new_tokens=40)
    z, batch = _z(text_encoder=text_encoder), cap.tokenize(CAPTIONS)
    opt = torch.optim.AdamW([p for p in cap.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        loss = cap(z=z, **batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    cap.eval()
    for beams in (1, 4):
        assert cap.generate(z=z, num_beams=beams) == CAPTIONS
    ids = cap.generate_ids(z=z, num_beams=1)  # (B, T): no prompt positions, EOS then padding
    assert ids.shape[1] == max(len(cap.tokenizer(c).input_ids) for c in CAPTIONS) + 1  # the longest's EOS, not 40
    for row, caption in zip(ids.tolist(), CAPTIONS, strict=True):
        n = len(cap.tokenizer(caption).input_ids)
        assert row[n] == cap.eos_token_id and cap.eos_token_id not in row[:n]
        assert all(t == cap.pad_token_id for t in row[n + 1 :])


def test_greedy_generate_equals_a_hand_written_loop(text_encoder):
    cap = _captioner(text_encoder).eval()
    with torch.no_grad():
        cap.lm.model.embed_tokens.weight.mul_(20)  # sharper logits, so the argmax is not a near-tie
    z, steps = _z(3, text_encoder=text_encoder), 10
    ids = cap.generate_ids(z=z, num_beams=1, max_new_tokens=steps)
    with torch.no_grad():
        embeds = cap.prefix(z)  # (B, Nq, d_LM)
        done = torch.zeros(3, dtype=torch.bool)
        out = []
        for _ in range(steps):
            nxt = cap.lm(inputs_embeds=embeds).logits[:, -1].argmax(-1)  # (B,) full recompute, no cache
            nxt = torch.where(done, torch.full_like(nxt, cap.pad_token_id), nxt)
            out.append(nxt)
            done |= nxt == cap.eos_token_id
            if done.all():
                break
            embeds = torch.cat([embeds, cap.lm.get_input_embeddings()(nxt)[:, None]], dim=1)
    assert torch.equal(ids, torch.stack(out, dim=1))


# ------------------------------------------------------------------------------------------ freezing
@pytest.mark.parametrize("level", ["mlp", "mlp+llm", "mlp+llm+encoder"])
def test_frozen_parts_do_not_move_in_a_training_step(level, text_encoder, stage1_dir, shapes_data, tmp_path):
    encoder = VLVEncoder.from_pretrained(stage1_dir)
    cap = _captioner(text_encoder, trainable=level, encoder=encoder)
    before = {k: v.clone() for k, v in cap.state_dict().items()}
    data = InMemory.of(shapes_data["train"], encoder.config.image_size, limit=8)
    train(Stage2Task(cap, data), TrainConfig(steps=1, batch_size=2, lr=1e-2, progress=False), tmp_path / "run")
    after = cap.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    groups = {"psi": "psi.", "T": "text_encoder.", "queries/phi": ("encoder.queries", "encoder.phi."),
              "florence": "encoder.florence.", "lm": "lm."}
    moved_groups = {g for g, prefix in groups.items() if any(k.startswith(prefix) for k in moved)}
    expected = {"mlp": {"psi"}, "mlp+llm": {"psi", "lm"}, "mlp+llm+encoder": {"psi", "lm", "florence"}}[level]
    assert moved_groups == expected


def test_lora_trains_adapters_only_and_round_trips(text_encoder, stage1_dir, shapes_data, tmp_path):
    """With lora_rank the LLM's own weights stay bit-identical; its peft adapters, psi and Florence train."""
    encoder = VLVEncoder.from_pretrained(stage1_dir)
    cap = _captioner(text_encoder, trainable="mlp+llm+encoder", encoder=encoder, lora_rank=4)
    lora = {k for k in cap.state_dict() if ".lora_" in k}
    assert lora and all(k.startswith("lm.") for k in lora)
    assert {n for n, p in cap.named_parameters() if p.requires_grad and n.startswith("lm.")} == lora
    before = {k: v.clone() for k, v in cap.state_dict().items()}
    data = InMemory.of(shapes_data["train"], encoder.config.image_size, limit=8)
    train(Stage2Task(cap, data), TrainConfig(steps=2, batch_size=2, lr=1e-2, progress=False), tmp_path / "run")
    moved = {k for k, v in cap.state_dict().items() if not torch.equal(before[k], v)}
    assert {k for k in moved if k.startswith("lm.")} == lora  # every adapter moved, no base weight did
    assert any(k.startswith("psi.") for k in moved) and any(k.startswith("encoder.florence.") for k in moved)
    out = cap.save_pretrained(tmp_path / "lora")
    assert (out / "lm-frozen.safetensors").exists()  # the frozen random-init base LLM
    torch.manual_seed(123)
    loaded = Captioner.from_pretrained(out, text_encoder, VLVEncoder.from_pretrained(stage1_dir))
    batch = cap.tokenize(CAPTIONS)
    z = _z(text_encoder=text_encoder)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(z=z, **batch).logits, cap.eval()(z=z, **batch).logits)
        px = encoder.transform.pixels(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
        assert torch.equal(loaded.embed_images(px), cap.embed_images(px))  # the fine-tuned encoder came back too


# ----------------------------------------------------------------------------------------- save/load
def test_save_load_round_trips_with_strict_keys(text_encoder, stage1_dir, tmp_path):
    z = _z(text_encoder=text_encoder)
    for level in ("mlp", "mlp+llm+encoder"):
        encoder = VLVEncoder.from_pretrained(stage1_dir)
        cap = _captioner(text_encoder, trainable=level, encoder=encoder).eval()
        with torch.no_grad():  # make every part differ from a fresh build
            for p in cap.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        out = cap.save_pretrained(tmp_path / level)
        assert (out / "lm-frozen.safetensors").exists() == (level == "mlp")  # random-init LM, frozen
        torch.manual_seed(123)  # a different random init underneath
        loaded = Captioner.from_pretrained(out, text_encoder, VLVEncoder.from_pretrained(stage1_dir)).eval()
        batch = cap.tokenize(CAPTIONS)
        with torch.no_grad():
            assert torch.equal(loaded(z=z, **batch).logits, cap(z=z, **batch).logits)
            px = encoder.transform.pixels(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
            assert torch.equal(loaded.embed_images(px), cap.embed_images(px))
    # Strict: weights saved at mlp+llm+encoder do not load into an mlp captioner.
    meta = json.loads((tmp_path / "mlp+llm+encoder" / "captioner.json").read_text())
    meta["config"]["trainable"] = "mlp"
    (tmp_path / "mlp+llm+encoder" / "captioner.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unexpected"):
        Captioner.from_pretrained(tmp_path / "mlp+llm+encoder", text_encoder, VLVEncoder.from_pretrained(stage1_dir))


# -------------------------------------------------------------------------------------------- runs
def test_train_lm_writes_a_standard_checkpoint_dir(lm_dir, shapes_data):
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    caption = InMemory.of(shapes_data["val"], 64).captions[0]
    assert tok.decode(tok(caption).input_ids) == caption
    assert (lm.config.eos_token_id, lm.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    history = json.loads((lm_dir / "checkpoint" / "trainer.json").read_text())["history"]
    evals = [r["eval"] for r in history if "eval" in r]
    # 3 steps take the held-out loss well below a uniform guess over the vocabulary (ln 336 = 5.82; measured
    # 5.06); the untrained LM scores 5.79, near the guess.
    assert [e["step"] for e in evals] == [3] and "sample_well_formed" in evals[-1]
    assert evals[-1]["val_loss"] < 0.95 * math.log(len(tok)), evals[-1]


def test_train_stage2_writes_a_loadable_run(tiny_teacher, stage1_dir, lm_dir, shapes_data, tmp_path):
    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage1_dir.iterdir())}

    stage1_before = digest()
    settings = Stage2Settings(decoder=str(tiny_teacher), encoder=str(stage1_dir), lm=str(lm_dir),
                              data=str(shapes_data["train"]), max_new_tokens=12)
    run = tmp_path / "s2"
    cap = train_stage2(settings, TrainConfig(steps=2, batch_size=3, lr=1e-3, eval_every=2, progress=False), run,
                       progress=False, evaluator=stage2_evaluator(shapes_data["val"], 3))
    assert cap is not None and digest() == stage1_before  # the stage-1 run is only read
    meta = json.loads((run / "stage2.json").read_text())
    assert meta["settings"]["encoder"] == str(stage1_dir.resolve()) and meta["settings"]["lm"] == str(lm_dir.resolve())
    evals = [r["eval"] for r in json.loads((run / "checkpoint" / "trainer.json").read_text())["history"] if "eval" in r]
    # After 2 steps every caption score is 0 (no floor fits): the eval ran once, at the end, and scored captions.
    assert [e["step"] for e in evals] == [2]
    assert {"caption_exact", "well_formed", "scene_accuracy", "object_f1"} <= set(evals[-1])
    loaded = Captioner.from_pretrained(run).eval()  # alone: its config names T's and the encoder's dirs
    px = cap.encoder.transform.pixels(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    cap.eval()
    assert loaded.generate(pixel_values=px, num_beams=2) == cap.generate(pixel_values=px, num_beams=2)
    batch = cap.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=px, **batch).logits, cap(pixel_values=px, **batch).logits)
