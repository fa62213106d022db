"""The weights shipped inside the package load by name, strictly, and carry their training record.

Each test skips where a checkout does not hold that weight set yet (they are shipped one by one).
"""

import json

import pytest
import torch

from vlv import shipped as presets


def _shipped(name: str):
    return pytest.mark.skipif(not presets.installed(name), reason=f"{name} not shipped in this checkout")


@_shipped("shapes-lm")
def test_shipped_lm_loads_strictly_and_speaks_the_grammar():
    from transformers import AutoModelForCausalLM

    from vlv.lm import build_lm, load_tokenizer
    from vlv.shapes import world as shapes

    path = presets.shipped_dir("shapes-lm")
    lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    lm, tok = build_lm("shapes-lm").eval(), load_tokenizer("shapes-lm")
    caption = "a large red circle at the top left and a small cyan square at the bottom right"
    assert tok.decode(tok(caption).input_ids) == caption
    out = lm.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=40, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out[0, -1] == tok.eos_token_id and shapes.is_well_formed(tok.decode(out[0], skip_special_tokens=True))
    assert json.loads((path / "training.json").read_text())["steps"] > 0


@_shipped("shapes-stage1")
def test_shipped_encoder_loads_strictly_by_name():
    from safetensors.torch import load_file

    from vlv.encoder import VLVEncoder

    path = presets.resolve_encoder("shapes-stage1")
    enc = VLVEncoder.from_pretrained(path).eval()
    assert set(load_file(path / "model.safetensors")) == {n for n, p in enc.named_parameters() if p.requires_grad}
    with torch.no_grad():
        size = enc.config.image_size
        z = enc(enc.transform.pixels(torch.zeros(2, size, size, 3, dtype=torch.uint8)))
    assert z.shape == (2, enc.config.num_queries, enc.config.text_dim) and torch.isfinite(z).all()
    record = json.loads((path / "training.json").read_text())
    assert record["steps"] > 0 and "reconstruction" in json.loads((path / "metrics.json").read_text())


@_shipped("shapes-stage1")
@pytest.mark.slow
def test_shipped_encoder_reconstructs_held_out_scenes(tmp_path):
    """Through the shipped teacher, the shipped encoder's embeddings redraw most held-out scenes exactly.

    metrics.json records 90% on 500 test scenes; the floor here (half of 32) catches broken weights, say a
    bad fp16 cast or a changed architecture, not a point of accuracy."""
    from vlv.data.datasets import InMemory
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder
    from vlv.shapes.data import write_shapes
    from vlv.shapes.metrics import reconstruction_scores

    write_shapes(tmp_path / "test", n=32, split="test", progress=False)
    decoder = DiffusionDecoder.from_pretrained(presets.resolve_decoder("shapes-teacher"))
    enc = VLVEncoder.from_pretrained(presets.resolve_encoder("shapes-stage1")).eval()
    scores = reconstruction_scores(enc, decoder, InMemory.of(tmp_path / "test", decoder.image_size),
                                   sampler="fast")
    assert scores.scene_accuracy >= 0.5, scores


@_shipped("shapes-stage2")
def test_shipped_captioner_names_its_shipped_parts():
    from vlv.captioner import Captioner

    path = presets.resolve_stage2("shapes-stage2")
    settings = json.loads((path / "stage2.json").read_text())["settings"]
    assert (settings["decoder"], settings["encoder"], settings["lm"]) == ("shapes-teacher", "shapes-stage1",
                                                                          "shapes-lm")
    captioner = Captioner.from_pretrained("shapes-stage2")  # alone: captioner.json names T and the encoder
    assert (captioner.config.text_encoder, captioner.config.encoder, captioner.config.lm) == (
        "shapes-teacher", "shapes-stage1", "shapes-lm")
    assert {"captions", "caption_to_image"} <= set(json.loads((path / "metrics.json").read_text()))


@_shipped("shapes-stage2")
@pytest.mark.slow
def test_shipped_captioner_captions_held_out_scenes(tmp_path):
    """The shipped captioner writes the exact caption of most held-out scenes (metrics.json: 99.4% of 500);
    the floor (3/4 of 32) catches broken weights or a changed pipeline, not a point of accuracy."""
    from vlv.captioner import Captioner
    from vlv.data.datasets import InMemory
    from vlv.shapes.data import write_shapes
    from vlv.shapes.metrics import caption_scores

    captioner = Captioner.from_pretrained("shapes-stage2").eval()
    data = InMemory.of(write_shapes(tmp_path / "test", n=32, split="test", progress=False),
                              captioner.encoder.config.image_size)
    scores = caption_scores(captioner, data, num_beams=1)
    assert scores["well_formed"] == 1.0 and scores["caption_exact"] >= 0.75, scores


@_shipped("shapes-teacher-sd3")
@pytest.mark.slow
def test_shipped_sd3_teacher_draws_held_out_scenes_with_no_vlv_code():
    """The second teacher is a stock SD3 dir: diffusers alone loads it (every weight present, none left over) and
    draws held-out captions (metrics.json records its accuracy on 500); the floor (3/4 of 16) catches broken
    weights or a layout the stock pipeline misreads, not a point of accuracy."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from vlv.shapes import world as shapes

    path = presets.resolve_decoder("shapes-teacher-sd3")
    _, info = SD3Transformer2DModel.from_pretrained(path / "transformer", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None,  # diffusers' no-T5
                                                    dtype=torch.float32, local_files_only=True)
    captions = [shapes.caption(shapes.scene_at(0, "test", i)) for i in range(16)]
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    images = pipe(captions, guidance_scale=2.0, num_inference_steps=28, height=size, width=size,
                  generator=torch.Generator().manual_seed(0)).images
    right = sum(shapes.detect(im) == shapes.parse_caption(c) for im, c in zip(images, captions, strict=True))
    assert right >= 12, right
    record = json.loads((path / "teacher.json").read_text())
    assert record["training"]["transformer_step"] > 0 and json.loads((path / "metrics.json").read_text())["teacher"]
