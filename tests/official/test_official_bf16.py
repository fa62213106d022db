"""The official importers on checkpoints saved as ``train_stage2.sh`` saves them (``--mixed_precision bf16``: every
tensor of model.pt is bf16, the frozen T, DaViT and projector included), checked against the references the official
code computed from such a checkpoint (``shared/fixtures/official-04bbfbb-bf16``, see its README: Caption_inference's
``--fp32``, the bf16 weights loaded into fp32 modules); skipped when the fixtures are absent.

Tolerances: 1e-5, the README's for a check that is not bitwise (vlv runs transformers 5's kernels, not the official
code's 4.51 modules). Measured max abs differences from the refs' ``s1.pixel_values`` (1 thread, torch 2.13 CPU):
Florence decoder output 4.8e-6, z 9.8e-7, T(z) 1.4e-6, prefix e 3.4e-7; teacher-forced logits 0 (bitwise) from the
official prefix and 1.2e-5 from vlv's own (checked at 2e-5, as for the fp32 fixture: the encoder's float differences
reach the logits amplified); the loss equal. These hold only because the import computes with the frozen weights
rounded to bf16 as the checkpoint holds them: with the bases' own fp32 T, DaViT and projector the prefix is off by
2.3e-3 (measured; 2.0e-3 from T alone).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parents[3] / "shared" / "fixtures" / "official-04bbfbb-bf16"
if not FIXTURES.is_dir():
    pytest.skip(f"official bf16 fixtures absent ({FIXTURES})", allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlv.captioner import Captioner  # noqa: E402
from vlv.encoder import VLVEncoder, load_florence2  # noqa: E402
from vlv.errors import InvalidInput  # noqa: E402
from vlv.official.stage1 import import_stage1, write_trained_as  # noqa: E402
from vlv.official.stage2 import import_stage2  # noqa: E402
from vlv.text_encoder import load_text_encoder  # noqa: E402

BASE_F2, BASE_SD, BASE_LM = (FIXTURES / "bases" / n for n in ("florence2", "sd", "qwen2"))
MODEL_PT = FIXTURES / "stage2" / "step_3" / "model.pt"
SIZE = 64  # the official runs' --image_size
ATOL = 1e-5
IGNORE = -100
T_KEY = "VLV_model.text_encoder.text_model.final_layer_norm.bias"
DAVIT_KEY = "VLV_model.model.vision_tower.convs.0.proj.weight"


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def refs():
    refs = FIXTURES / "refs"
    return {**load_file(refs / "stage1.safetensors"), **load_file(refs / "stage2.safetensors")}


@pytest.fixture(scope="module")
def official():
    return json.loads((FIXTURES / "refs" / "refs.json").read_text())


@pytest.fixture(scope="module")
def state():
    return torch.load(MODEL_PT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    return out, import_stage2(MODEL_PT, BASE_F2, BASE_SD, BASE_LM, out, crop_size=SIZE)


@pytest.fixture(scope="module")
def captioner(run):
    return Captioner.from_pretrained(run[0]).eval()


# ------------------------------------------------------------------------------------------- import
def test_import_accepts_a_bf16_checkpoint_and_says_so(run, captioner, state):
    out, done = run
    assert done.dtypes == {"bfloat16": 275} and done.frozen_dtype == "bfloat16" and done.written == "float32"
    assert done.dtype_line().startswith("checkpoint dtype: bfloat16 (all 275 tensors); frozen parts = the base dirs' "
                                        "rounded to bfloat16")
    assert sum(done.counts.values()) == 275
    assert captioner.config.text_encoder_dtype == "bfloat16" and captioner.encoder.config.frozen_dtype == "bfloat16"
    assert {v.dtype for v in load_file(out / "captioner.safetensors").values()} == {torch.float32}  # default fp32
    # Frozen parts: the bases' weights rounded to bf16, as the checkpoint holds them (and not the bases' own).
    base_t = load_text_encoder(BASE_SD).final_layer_norm.bias
    ours_t = captioner.text_encoder.final_layer_norm.bias
    assert torch.equal(ours_t, state[T_KEY].float()) and not torch.equal(ours_t, base_t)
    base_conv = load_florence2(out / "encoder" / "florence2").model.vision_tower.convs[0].conv.weight
    ours_conv = captioner.encoder.florence.model.vision_tower.convs[0].conv.weight
    assert torch.equal(ours_conv, state[DAVIT_KEY].float()) and torch.equal(ours_conv, base_conv.bfloat16().float())
    assert not torch.equal(ours_conv, base_conv)
    # Trained parts: the checkpoint's values, in fp32.
    assert torch.equal(captioner.psi[2].bias, state["mlp.layers.2.bias"].float())
    assert torch.equal(captioner.lm.model.layers[1].mlp.up_proj.weight,
                       state["qwen2_model.model.layers.1.mlp.up_proj.weight"].float())
    shared = captioner.encoder.florence.model.language_model.shared.weight
    assert torch.equal(shared, state["VLV_model.model.language_model.model.shared.weight"].float())


def test_written_in_bf16_is_the_same_model_in_half_the_space(run, captioner, tmp_path):
    out = tmp_path / "run"
    done = import_stage2(MODEL_PT, BASE_F2, BASE_SD, BASE_LM, out, crop_size=SIZE, dtype="bf16")
    assert done.written == "bfloat16"
    for file in (out / "captioner.safetensors", out / "encoder" / "model.safetensors"):
        assert {v.dtype for v in load_file(file).values()} == {torch.bfloat16}
    size = (out / "captioner.safetensors").stat().st_size
    assert size < 0.6 * (run[0] / "captioner.safetensors").stat().st_size
    a, b = Captioner.from_pretrained(out).state_dict(), captioner.state_dict()  # bf16 values are exact in fp32
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- equality
def test_prefix_matches_the_official(captioner, refs):
    seen = {}
    hook = captioner.encoder.florence.model.language_model.decoder.register_forward_hook(
        lambda m, i, o: seen.__setitem__("dec", o.last_hidden_state))
    with torch.no_grad():
        z = captioner.embed_images(refs["s1.pixel_values"])
        t_z = captioner.encode_text_embeds(z)
        e = captioner.prefix(z)
    hook.remove()
    close(seen["dec"], refs["s2.decoder_last_hidden_state"])
    close(z, refs["s2.z"])
    close(t_z, refs["s2.T_z"])
    close(e, refs["s2.prefix_e"])


def _official_forward(captioner, e, ids):
    """The official CLIPDecoder.forward from the LM directly (labels -100 on the prefix and on pad = EOS)."""
    pad = captioner.pad_token_id
    b, nq = e.shape[:2]
    embeds = torch.cat([e, captioner.lm.get_input_embeddings()(ids)], dim=1)  # (B, Nq + 300, d_LM)
    mask = torch.cat([torch.ones(b, nq, dtype=torch.long), (ids != pad).long()], dim=1)
    labels = torch.cat([torch.full((b, nq), IGNORE), ids.masked_fill(ids == pad, IGNORE)], dim=1)
    logits = captioner.lm(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Nq + 300, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    return logits, loss


@pytest.mark.parametrize("prefix, atol", [("official", ATOL), ("vlv", 2e-5)])
def test_teacher_forced_logits_and_loss(captioner, refs, official, prefix, atol):
    ids = refs["s2.caption_input_ids"]
    with torch.no_grad():
        e = refs["s2.prefix_e"] if prefix == "official" else captioner.prefix(
            captioner.embed_images(refs["s1.pixel_values"]))
        logits, loss = _official_forward(captioner, e, ids)
    nq = e.shape[1]
    for i, n in enumerate((ids != captioner.pad_token_id).sum(1).tolist()):
        span = slice(nq - 1, nq + n)  # the positions that predict the caption tokens and the (unlearned) EOS
        close(logits[i, span], refs["s2.logits"][i, span], atol=atol)
    assert loss.item() == pytest.approx(official["stage2_loss"], rel=1e-6)


def test_greedy_ids(captioner, refs, official):
    """vlv's fp32 generate vs the official one (bf16 inputs_embeds): every recorded top-2 margin is >= 0.069, far
    above what the cast moves, so the greedy ids agree at all 20 steps."""
    assert min(official["stage2_greedy_min_top2_margin_per_step"]) > 0.05
    with torch.no_grad():
        ids = captioner.generate_ids(pixel_values=refs["s1.pixel_values"], num_beams=1, max_new_tokens=20)
    assert torch.equal(ids, refs["s2.generate_ids_beams1"])


@pytest.mark.parametrize("num_beams", [1, 4])
def test_the_official_generate_is_reproduced_given_its_bf16_cast(captioner, refs, num_beams):
    """Given what the official generate hands Qwen2 (the official prefix cast to bf16, a bf16 mask), the imported LM
    gives the recorded ids, and for greedy the recorded scores, exactly (measured 0). vlv's own fp32 beam search
    keeps the first three rows and parts on the fourth at step 6: beam search records no margins, and the cast
    alone moves the prefix by up to 1e-3."""
    e = refs["s2.prefix_e"].to(torch.bfloat16)
    with torch.no_grad():
        out = captioner.lm.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.bfloat16),
                                    do_sample=False, num_beams=num_beams, max_new_tokens=20, early_stopping=True,
                                    output_scores=True, return_dict_in_generate=True,
                                    eos_token_id=captioner.eos_token_id, pad_token_id=captioner.pad_token_id)
    assert torch.equal(out.sequences, refs[f"s2.generate_ids_beams{num_beams}"])
    if num_beams == 1:
        close(torch.stack(out.scores, 1), refs["s2.generate_beams1_scores"], atol=0)


# ------------------------------------------------------------------------------------------- strict
def _next_up(t: torch.Tensor) -> torch.Tensor:
    """Every element one bf16 ulp away from itself (the smallest difference a bf16 checkpoint can show)."""
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def _edited(state, tmp_path, edit):
    state = {k: v.clone() for k, v in state.items()}
    edit(state)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__(DAVIT_KEY, _next_up(s[DAVIT_KEY])), "Florence-2 dir .* does not match"),
    (lambda s: s.__setitem__(T_KEY, _next_up(s[T_KEY])),
     "decoder dir .* does not match the checkpoint: .*final_layer_norm.bias differs even rounded to the checkpoint's "
     "bfloat16"),
    (lambda s: s.__setitem__(T_KEY, load_text_encoder(BASE_SD).final_layer_norm.bias.detach()),  # the base's fp32
     r"frozen VLV_model.text_encoder weights .* several dtypes"),
    (lambda s: s.__setitem__("mlp.layers.2.bias", s["mlp.layers.2.bias"].double()),
     "mlp.layers.2.bias: dtype float64"),
], ids=["davit-one-ulp", "text-encoder-one-ulp", "mixed-dtypes", "float64"])
def test_a_bf16_import_stays_strict(state, tmp_path, edit, message):
    """Rounding is the one difference allowed: a frozen tensor one bf16 ulp off the rounded base is refused."""
    ckpt = _edited(state, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        import_stage2(ckpt, BASE_F2, BASE_SD, BASE_LM, tmp_path / "run", crop_size=SIZE)
    assert not (tmp_path / "run").exists()


def test_dtype_choices(tmp_path):
    with pytest.raises(InvalidInput, match="dtype 'fp64'"):
        import_stage2(MODEL_PT, BASE_F2, BASE_SD, BASE_LM, tmp_path / "run", dtype="fp64")
    big = torch.nn.Linear(2, 2)
    with torch.no_grad():
        big.weight.fill_(1e5)  # beyond fp16's 65504, within bf16's range
    with pytest.raises(InvalidInput, match="weight does not fit float16"):
        write_trained_as(big, torch.float16)
    write_trained_as(big, torch.bfloat16)
    assert big.weight.dtype == torch.bfloat16 and big.weight.requires_grad


def test_stage1_in_bf16(tmp_path):
    """The stage-1 importer takes a bf16 checkpoint alike (every tensor cast, as mixed precision saves it; the
    frozen SD parts are checked after rounding the decoder's weights, the DaViT kept rounded)."""
    state = torch.load(FIXTURES / "stage1" / "plain" / "checkpoint_3.pt", map_location="cpu",
                       weights_only=True)["model_state_dict"]
    ckpt = tmp_path / "checkpoint_3.pt"
    torch.save({"step": 3, "model_state_dict": {k: v.bfloat16() for k, v in state.items()}}, ckpt)
    done = import_stage1(ckpt, BASE_F2, BASE_SD, tmp_path / "run", crop_size=SIZE)
    assert done.dtypes == {"bfloat16": 632} and done.frozen_dtype == "bfloat16" and sum(done.counts.values()) == 632
    assert done.dtype_line().endswith("the SD parts matched --decoder rounded to bfloat16, and vlv's decoder computes "
                                      "with --decoder's own weights")
    enc = VLVEncoder.from_pretrained(tmp_path / "run")
    conv = enc.florence.model.vision_tower.convs[0].conv.weight
    assert torch.equal(conv, state["model.vision_tower.convs.0.proj.weight"].bfloat16().float())
    assert torch.equal(enc.queries, state["query_embed"].bfloat16().float())


# ----------------------------------------------------------------------------------------------- cli
@pytest.mark.slow
def test_cli_import_says_the_dtype_then_captions(tmp_path):
    cmd = [sys.executable, "-m", "vlv.cli"]
    r = subprocess.run([*cmd, "import-official", "stage2", str(MODEL_PT), "--florence2", str(BASE_F2), "--decoder",
                        str(BASE_SD), "--lm", str(BASE_LM), "--out", str(tmp_path / "run"), "--image-size", str(SIZE),
                        "--dtype", "bf16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert ("checkpoint dtype: bfloat16 (all 275 tensors); frozen parts = the base dirs' rounded to bfloat16, used "
            "so; trained weights written in bfloat16") in r.stdout, r.stdout
    from vlv.cli import main

    images = sorted((FIXTURES / "images").glob("img*.png"))
    assert main(["caption", *map(str, images), "--model", str(tmp_path / "run"), "--num-beams", "1",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "X.jsonl")]) == 0
    assert len((tmp_path / "X.jsonl").read_text().splitlines()) == 4
