import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Florence2ForConditionalGeneration

from vlv.config import DEFAULT_TRAINABLE, EncoderConfig
from vlv.encoder import (
    FROZEN_FILE,
    TRAINABLE_FILE,
    VLVEncoder,
    florence2_config,
    list_florence2_configs,
    load_florence2,
)


def _shapes(**overrides) -> VLVEncoder:
    torch.manual_seed(0)
    return VLVEncoder(EncoderConfig.named("shapes", text_dim=32, **{"num_queries": 12, **overrides}))


def test_z_shape_and_visual_token_grid():
    enc = _shapes().eval()
    x = torch.randn(3, 3, 64, 64)  # odd batch
    v = enc.florence.model.get_image_features(x).pooler_output
    assert v.shape == (3, 1 + 8 * 8, 128)  # pooled token + an 8x8 grid at 64 px
    z = enc(x)
    assert z.shape == (3, 12, 32) and torch.isfinite(z).all()
    assert sum(p.numel() for p in enc.parameters()) < 2_000_000


def test_query_self_attention_is_causal():
    enc = _shapes().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = enc(x)
        enc.queries[:, 5:] += torch.randn_like(enc.queries[:, 5:])
        z2 = enc(x)
    assert torch.allclose(z[:, :5], z2[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(z[:, 5:], z2[:, 5:])


def test_queries_see_the_image():
    enc = _shapes().eval()
    with torch.no_grad():
        a, b = enc(torch.randn(1, 3, 64, 64)), enc(torch.randn(1, 3, 64, 64))
    assert not torch.allclose(a, b)


def test_phi_init_gain_scales_z_and_is_saved(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    plain, large = _shapes().eval(), _shapes(phi_init_gain=16.0).eval()  # same seed: same weights but phi's last
    assert plain.config.phi_init_gain is None  # layer; a named config sets no gain (recipes do)
    with torch.no_grad():
        z, z16 = plain(x), large(x)
    assert torch.allclose(z16, 16 * z, rtol=1e-5, atol=1e-5)  # the whole output layer, bias included, scaled
    assert VLVEncoder.from_pretrained(large.save_pretrained(tmp_path)).config.phi_init_gain == 16.0
    with pytest.raises(ValueError, match="phi_init_gain"):
        EncoderConfig(text_dim=32, phi_init_gain=0.0)


def test_freezing_is_declarative():
    enc = _shapes(trainable=list(DEFAULT_TRAINABLE))
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "queries" in trainable and "phi.0.weight" in trainable and "phi.2.bias" in trainable
    assert any(n.startswith("florence.model.language_model.decoder.") for n in trainable)
    assert not any(n.startswith(("florence.model.vision_tower", "florence.model.multi_modal_projector"))
                   for n in trainable)
    enc.train()
    assert not enc.florence.model.vision_tower.training and enc.florence.model.language_model.training
    assert all(p.requires_grad for p in _shapes().parameters())  # shapes preset: "all"
    with pytest.raises(ValueError, match="matches no parameter"):
        _shapes(trainable=["querie"])
    with pytest.raises(ValueError):
        EncoderConfig(text_dim=32, trainable=[])


def test_cached_image_features_stand_in_for_a_frozen_vision_tower():
    """z from v' = image_features(x) equals z from x; with a training tower, features cannot replace it."""
    enc = _shapes(trainable=list(DEFAULT_TRAINABLE)).train()
    x = torch.randn(3, 3, 64, 64)
    v = enc.image_features(x)
    assert not v.requires_grad  # frozen: no graph through the DaViT
    torch.manual_seed(1)
    a = enc(x)
    torch.manual_seed(1)  # same dropout draws in the trained BART
    b = enc(image_features=v)
    assert torch.equal(a, b) and b.requires_grad
    with pytest.raises(ValueError, match="exactly one"):
        enc(x, image_features=v)
    trains_vision = _shapes()
    assert enc.vision_frozen and not enc.config.trains_vision  # the config knows it before the model is built
    assert not trains_vision.vision_frozen and trains_vision.config.trains_vision
    assert EncoderConfig(text_dim=8, trainable=["florence.model.vision_tower.convs"]).trains_vision
    with pytest.raises(ValueError, match="trains"):
        trains_vision(image_features=trains_vision.image_features(x))
    with torch.no_grad():  # inference may still use features
        trains_vision.eval()
        assert torch.equal(trains_vision(image_features=trains_vision.image_features(x)), trains_vision(x))


def test_preprocess_is_the_transform_training_and_inference_call():
    """preprocess (PIL in: the API's way) and transform.pixels of the crops (the reader crops in workers: training's
    and the inference commands' way) are one path, bit for bit."""
    enc = _shapes()
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    from_pil = enc.preprocess([Image.fromarray(a) for a in arrays])
    assert from_pil.shape == (3, 3, 64, 64) and torch.equal(from_pil, enc.transform.pixels(arrays))
    big = enc.preprocess([Image.fromarray(np.zeros((100, 80, 3), np.uint8))])  # centre square, resized
    assert big.shape == (1, 3, 64, 64)
    assert torch.allclose(big[0, :, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


@pytest.mark.parametrize("trainable", ["all", list(DEFAULT_TRAINABLE)])
def test_save_load_round_trip_exact(tmp_path, trainable):
    enc = _shapes(trainable=trainable)
    with torch.no_grad():
        enc.phi[0].weight.add_(1.0)  # not the init any more
    enc.save_pretrained(tmp_path)
    assert (tmp_path / FROZEN_FILE).exists() == (trainable != "all")  # random-init frozen parts are saved
    torch.manual_seed(123)  # a different random init underneath
    loaded = VLVEncoder.from_pretrained(tmp_path)
    assert loaded.config == enc.config and loaded.config.prompt_ids == [0, 2]
    a, b = enc.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == \
        [n for n, p in loaded.named_parameters() if p.requires_grad]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc.eval()(x), loaded.eval()(x))


def test_load_is_strict(tmp_path):
    _shapes().save_pretrained(tmp_path)
    state = load_file(tmp_path / TRAINABLE_FILE)
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / TRAINABLE_FILE)
    with pytest.raises(ValueError, match="unexpected"):
        VLVEncoder.from_pretrained(tmp_path)
    del state["extra"], state["queries"]
    save_file(state, tmp_path / TRAINABLE_FILE)
    with pytest.raises(ValueError, match="missing"):
        VLVEncoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        VLVEncoder.from_pretrained(tmp_path / "nothing")


def test_florence2_from_a_local_checkpoint_dir(tmp_path):
    torch.manual_seed(0)
    florence = Florence2ForConditionalGeneration(florence2_config("florence2-shapes"))
    florence.save_pretrained(tmp_path / "florence")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):  # prompt text needs the dir's tokenizer
        VLVEncoder(EncoderConfig(florence2=str(tmp_path / "florence"), image_size=64, text_dim=32))
    cfg = EncoderConfig(florence2=str(tmp_path / "florence"), image_size=64, text_dim=32, num_queries=4,
                        prompt_ids=[0, 5, 2])
    enc = VLVEncoder(cfg)
    ref = florence.state_dict()
    assert all(torch.equal(v, ref[k.removeprefix("florence.")]) for k, v in enc.state_dict().items()
               if k.startswith("florence."))
    enc.save_pretrained(tmp_path / "enc")
    assert not (tmp_path / "enc" / FROZEN_FILE).exists()  # frozen weights are re-read from the Florence dir
    loaded = VLVEncoder.from_pretrained(tmp_path / "enc")
    a, b = enc.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="no Florence-2 checkpoint"):
        load_florence2(tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        VLVEncoder(EncoderConfig(text_dim=32, florence2=str(tmp_path / "absent"), prompt_ids=[0, 2]))


def test_florence2_large_config_is_the_spec():
    assert {"florence2-large", "florence2-shapes"} <= set(list_florence2_configs())
    cfg = florence2_config("florence2-large")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.model_type, t.d_model, t.encoder_layers, t.decoder_layers, t.vocab_size) == ("bart", 1024, 12, 12, 51328)
    assert (t.max_position_embeddings, t.encoder_ffn_dim, t.scale_embedding) == (4096, 4096, False)
    assert list(v.embed_dim) == [256, 512, 1024, 2048] and list(v.depths) == [1, 1, 9, 1]
    assert v.projection_dim == 1024 and v.window_size == 12
    with torch.device("meta"):
        enc = VLVEncoder(EncoderConfig.named("florence2-large", text_dim=1024))  # SD 2.1's d_T
    n_florence = sum(p.numel() for p in enc.florence.parameters())
    assert 0.77e9 < n_florence < 0.78e9  # model card: about 0.77 B
    assert enc.queries.shape == (1, 77, 1024) and enc.phi[2].out_features == 1024
    assert EncoderConfig(**json.loads(json.dumps(asdict(enc.config)))) == enc.config  # JSON round trip
