"""Devices and precisions: the defaults, one-line refusals before anything loads, models loaded straight into
their dtype (no fp32 copy first, ties kept), and inference that hands back fp32 on the CPU.

bf16 against fp32: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%). Rounding the weights and every
activation of a network a few blocks deep compounds that to a relative error of about 1%, so outputs are
compared by their relative L2 error with the bound BF16_RTOL = 2^-4 (6%, 16 roundoffs): far above that
compounding, far below the O(1) error of a wrong, missing or transposed weight. A reconstruction runs the encoder,
T, the UNet at every sampler step and the VAE, and classifier-free guidance at g = 2 multiplies the error of the
conditional-minus-unconditional noise by g: its bound is RECON_RTOL = 2^-3.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import vlv.modeling
from vlv.captioner import Captioner, CaptionerConfig
from vlv.config import EncoderConfig
from vlv.decoder import DiffusionDecoder
from vlv.encoder import VLVEncoder
from vlv.errors import InvalidInput
from vlv.inference import caption_images, embed_images, placed, reconstruct_images, text_embeds_of
from vlv.modeling import PRECISIONS, resolve_device, resolve_dtype
from vlv.shapes.tokenizers import build_shapes_tokenizer
from vlv.text_encoder import load_text_encoder

BF16_RTOL, RECON_RTOL = 2.0**-4, 2.0**-3
TINY_LM = dict(model_type="qwen2", vocab_size=336, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def _images(n: int) -> np.ndarray:
    """n random uint8 images (n, 64, 64, 3), as the encoder's transform cuts them."""
    return np.random.default_rng(n).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


# ------------------------------------------------------------------------------------------ choosing
def test_defaults_on_a_cpu_only_machine_are_cpu_and_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placed(None, None) == {"device": torch.device("cpu"), "dtype": torch.float32}


def test_under_a_launcher_cuda_is_this_processs_own_gpu(monkeypatch):
    """torchrun sets LOCAL_RANK: every process on cuda:0 would put all of them on one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(InvalidInput, match="cuda:0..1"):
        resolve_device("cuda")


def test_defaults_on_a_gpu_are_cuda_and_bf16_where_it_is_native(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert placed(None, None) == {"device": torch.device("cuda"), "dtype": torch.bfloat16}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # pre-Ampere
    assert resolve_dtype(None, torch.device("cuda")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16


def test_names_and_dtypes_are_both_taken():
    assert [resolve_dtype(n, torch.device("cpu")) for n in ("fp32", "bf16", "fp16")] == list(PRECISIONS.values())
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_cli_offers_the_librarys_precisions():
    from vlv.cli.flags import PRECISION_CHOICES

    assert tuple(PRECISIONS) == PRECISION_CHOICES


@pytest.mark.parametrize(("device", "precision", "named"), [
    ("tpu", None, "not a device"), ("cuda:x", None, "not a device"), ("meta", None, "vlv runs on"),
    ("cpu", "fp8", "precision 'fp8'"), ("cpu", torch.int8, "dtype torch.int8")])
def test_unknown_devices_and_precisions_are_refused(device, precision, named):
    with pytest.raises(InvalidInput, match=named):
        placed(device, precision)


def test_absent_devices_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInput, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InvalidInput, match=r"2 CUDA device\(s\), cuda:0..1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InvalidInput, match="MPS is not available"):
        resolve_device("mps")


def test_commands_refuse_a_bad_device_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from vlv.cli import main
    from vlv.shapes.data import write_shapes

    def no_load(*args, **kwargs):
        raise AssertionError("a model loaded")

    for cls in (Captioner, VLVEncoder, DiffusionDecoder):
        monkeypatch.setattr(cls, "from_pretrained", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = write_shapes(tmp_path / "scenes", n=1, seed=0, split="val", progress=False)
    models = ["--encoder", "shapes-stage1", "--decoder", "shapes-teacher"]
    for argv in (["caption", str(images), "--out", str(tmp_path / "c.jsonl")],
                 ["embed", str(images), *models, "--out", str(tmp_path / "z.safetensors")],
                 ["reconstruct", str(images), *models, "--out", str(tmp_path / "r")],
                 ["compose", str(images / "000000.png"), str(images / "000000.png"), *models,
                  "--out", str(tmp_path / "ab.png")]):
        assert main([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["vlv: error: device 'cuda': no CUDA device is available to this torch"], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]  # nothing written


# ----------------------------------------------------------------------------------- loading in a dtype
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    enc = VLVEncoder(EncoderConfig.named("shapes", text_dim=32, num_queries=8))
    return enc.save_pretrained(tmp_path_factory.mktemp("enc") / "enc")


def test_encoder_loads_straight_into_bf16_and_computes_close_to_fp32(encoder_dir, monkeypatch):
    ref = VLVEncoder.from_pretrained(encoder_dir).eval()
    built: list[bool] = []  # per model built: were all its parameters empty (meta) when built?

    def spy(build, dtype):
        model = vlv.modeling.empty_model(build, dtype)
        built.append(all(p.is_meta for p in model.parameters()))
        return model

    monkeypatch.setattr("vlv.encoder.empty_model", spy)
    enc = VLVEncoder.from_pretrained(encoder_dir, dtype=torch.bfloat16).eval()
    assert built[0]  # Florence-2 got no memory before its weights were read: no fp32 copy first
    assert _dtypes(enc) == {torch.bfloat16}
    assert {k: v.dtype for k, v in enc.state_dict().items()} == {k: torch.bfloat16 for k in ref.state_dict()}
    x = _images(3)
    z, z_ref = embed_images(enc, x), embed_images(ref, x)
    assert (z.dtype, z.device) == (torch.float32, torch.device("cpu"))  # results come back in fp32
    assert 0 < _rel(z, z_ref) < BF16_RTOL, _rel(z, z_ref)
    assert torch.equal(embed_images(VLVEncoder.from_pretrained(encoder_dir, dtype=torch.float32), x), z_ref)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny pretrained-LM dir (weights + tokenizer), as a Qwen checkpoint dir is laid out."""
    out = tmp_path_factory.mktemp("lm") / "lm"
    torch.manual_seed(0)
    from vlv.lm import lm_config

    AutoModelForCausalLM.from_config(lm_config(TINY_LM), dtype=torch.float32).save_pretrained(out)
    build_shapes_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def captioner_dir(tiny_teacher, encoder_dir, lm_dir, tmp_path_factory):
    """A stage-2 dir at level mlp+llm+encoder over an LM dir: the whole LLM is in its captioner file."""
    text_encoder = load_text_encoder(tiny_teacher)
    torch.manual_seed(0)
    config = CaptionerConfig(text_dim=32, lm=str(lm_dir), trainable="mlp+llm+encoder", max_new_tokens=6,
                             num_beams=2, text_encoder=str(tiny_teacher), encoder=str(encoder_dir))
    cap = Captioner(config, text_encoder, VLVEncoder.from_pretrained(encoder_dir))
    with torch.no_grad():  # fine-tuned: the LLM's weights now differ from its dir's
        for p in cap.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return cap.save_pretrained(tmp_path_factory.mktemp("cap") / "cap")


def test_captioner_reads_each_weight_once_straight_into_bf16(captioner_dir, monkeypatch):
    """The LLM trained in full is built empty and filled from the captioner file alone: its source dir's weights
    are never read, and no parameter holds memory before its tensor is read (no second copy, in any dtype)."""
    def no_dir(*args, **kwargs):
        raise AssertionError("the LM dir's weights were read")

    entry: list[tuple[str, list[str]]] = []
    load = vlv.modeling.load_weights_file

    def spy(module, path, trainable=True, **kw):
        params = [n for n, p in module.named_parameters() if p.requires_grad == trainable]
        entry.append((path.name, [n for n in params if not module.get_parameter(n).is_meta]))
        return load(module, path, trainable, **kw)

    ref = Captioner.from_pretrained(captioner_dir).eval()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_dir)
    monkeypatch.setattr("vlv.captioner.load_weights_file", spy)
    cap = Captioner.from_pretrained(captioner_dir, dtype=torch.bfloat16).eval()
    lm_entry = [allocated for name, allocated in entry if name == "captioner.safetensors"]
    # At entry only the encoder's parts (loaded from the stage-1 run, replaced by their fine-tuned values) had memory.
    assert len(lm_entry) == 1 and all(n.startswith("encoder.") for n in lm_entry[0]), lm_entry
    assert _dtypes(cap) == {torch.bfloat16} and not any(p.is_meta for p in cap.parameters())
    assert cap.lm.lm_head.weight is cap.lm.get_input_embeddings().weight  # the tie survived
    assert torch.equal(cap.lm.lm_head.weight.float(), ref.lm.lm_head.weight.bfloat16().float())

    px = ref.encoder.transform.pixels(_images(2))
    batch = ref.tokenize(["a small red circle at the top left", "a large blue square"])
    with torch.no_grad():
        logits, ref_logits = cap(pixel_values=px.bfloat16(), **batch).logits, ref(pixel_values=px, **batch).logits
    assert 0 < _rel(logits, ref_logits) < BF16_RTOL, _rel(logits, ref_logits)
    captions = caption_images(cap, _images(2))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_frozen_lm_comes_from_its_dir_in_the_dtype(tiny_teacher, encoder_dir, lm_dir, tmp_path):
    """At level mlp the LLM stays in its dir: loaded from there, straight into bf16, and equal to it."""
    text_encoder = load_text_encoder(tiny_teacher)
    config = CaptionerConfig(text_dim=32, lm=str(lm_dir), trainable="mlp", text_encoder=str(tiny_teacher),
                             encoder=str(encoder_dir))
    out = Captioner(config, text_encoder, VLVEncoder.from_pretrained(encoder_dir)).save_pretrained(tmp_path / "c")
    cap = Captioner.from_pretrained(out, dtype=torch.bfloat16)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.bfloat16, local_files_only=True)
    assert _dtypes(cap) == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(cap.lm.state_dict().values(), lm.state_dict().values(), strict=True))


def test_decoder_loads_in_bf16_and_reconstructs_close_to_fp32(tiny_teacher, encoder_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers 0.42's ``dtype``, not the deprecated torch_dtype
        dec = DiffusionDecoder.from_pretrained(tiny_teacher, dtype=torch.bfloat16)
    assert _dtypes(dec) == {torch.bfloat16}
    ref_dec, ref_enc = DiffusionDecoder.from_pretrained(tiny_teacher), VLVEncoder.from_pretrained(encoder_dir)
    enc = VLVEncoder.from_pretrained(encoder_dir, dtype=torch.bfloat16)
    x = _images(2)
    out, ref = (reconstruct_images(e, d, x, steps=2) for e, d in ((enc, dec), (ref_enc, ref_dec)))
    assert (out.dtype, out.device, out.shape) == (torch.float32, torch.device("cpu"), ref.shape)
    assert 0 < _rel(out, ref) < RECON_RTOL, _rel(out, ref)
    z = embed_images(ref_enc, x)
    t_z = text_embeds_of(dec.text_encoder, z)
    assert t_z.dtype == torch.float32 and 0 < _rel(t_z, text_embeds_of(ref_dec.text_encoder, z)) < BF16_RTOL


# ------------------------------------------------------------------------------------- the shipped chain
@pytest.mark.slow
def test_shipped_captioner_loads_exactly_as_before(tmp_path):
    """The default (CPU, fp32) load of the shipped stage 2 equals the old way, bit for bit: build the LLM from
    its dir in fp32, then copy the captioner file over it; its captions of shapes scenes are the same."""
    from safetensors.torch import load_file

    from vlv.data.images import load_image
    from vlv.lm import build_lm
    from vlv.shapes.data import write_shapes
    from vlv.shipped import shipped_dir

    cap = Captioner.from_pretrained("shapes-stage2").eval()
    run = shipped_dir("shapes-stage2")
    config = CaptionerConfig(**json.loads((run / "captioner.json").read_text())["config"])
    old = Captioner(config, load_text_encoder(shipped_dir("shapes-teacher")),
                    VLVEncoder.from_pretrained("shapes-stage1"), lm=build_lm(config.lm)).eval()
    vlv.modeling.load_trainable_state(old, load_file(run / "captioner.safetensors"))
    new_state, old_state = cap.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys() and all(torch.equal(new_state[k], old_state[k]) for k in new_state)
    assert cap.lm.lm_head.weight is cap.lm.get_input_embeddings().weight
    folder = write_shapes(tmp_path / "scenes", n=3, seed=3, split="val", progress=False)
    x = np.stack([load_image(p, 64) for p in sorted(folder.glob("*.png"))])
    assert caption_images(cap, x) == caption_images(old, x)
