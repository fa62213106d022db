"""`vlv evaluate images`: FID against scipy's matrix square root, KID against its formula written out, and the
plumbing (pairing by name, resize protocols, CLIP-I, errors) with a TorchScript stand-in of the Inception file."""

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from vlv.cli import main
from vlv.errors import InvalidInput
from vlv.evaluation import images as im
from vlv.evaluation.jobs import evaluate_images


def _scipy_fid(a, b):
    """StyleGAN2-ADA's / clean-fid's formula: scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


# More rows than dimensions (the covariances' route), fewer on one side or both (the rows' route).
@pytest.mark.parametrize("n,m,d", [(200, 205, 16), (20, 45, 24), (12, 17, 32)])
def test_frechet_distance_equals_scipys(n, m, d):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(0.3, 1.2, size=(m, d)) @ rng.normal(size=(d, d))
    assert im.fid(a, b) == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    assert im.fid(b, a) == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    assert abs(im.fid(a, a)) < 1e-7 * np.trace(np.cov(a, rowvar=False))  # zero, to rounding


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.5, 1, size=(9, 5))

    def k(u, v):
        return (u @ v / 5 + 1) ** 3

    m = len(x)
    direct = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2)
    mean, std, size = im.kid(x, y, num_subsets=3)  # each subset is all rows, shuffled: the same value
    assert size == 9 and mean == pytest.approx(direct, rel=1e-10) and std == pytest.approx(0, abs=1e-10)
    small, _, size = im.kid(x, y, num_subsets=50, max_subset_size=4)
    assert size == 4 and small != pytest.approx(direct)


def test_clean_resize_is_per_channel_float_bicubic():
    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8))
    x = im.inception_input(pic, "clean")
    assert x.shape == (3, 299, 299) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 255
    red = np.asarray(Image.fromarray(np.asarray(pic)[:, :, 0].astype(np.float32), mode="F").resize((299, 299),
                                                                                                   Image.BICUBIC))
    assert np.array_equal(x[0], red.clip(0, 255))
    assert im.inception_input(pic, "network").shape == (3, 37, 61)
    assert im.inception_input(pic, "network", crop="center").shape == (3, 37, 37)


def _folder(path, names, seed, size=(24, 24), suffix=".png"):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path / f"{n}{suffix}")
    return path


def test_images_pair_by_name_and_use_the_network_as_called(tmp_path, standin_inception, tiny_clip):
    real = _folder(tmp_path / "real", ["a", "b", "c", "d"], 0, size=(30, 40), suffix=".jpg")
    gen = _folder(tmp_path / "gen", ["a", "b", "c", "d", "extra"], 1)
    m = evaluate_images(gen, real, standin_inception, tmp_path / "out", clip=tiny_clip)
    assert m["paired"] == 4 and m["n_gen"] == 4 and m["n_real"] == 4 and "1 generated" in m["notes"][0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(standin_inception))
    names = ["a", "b", "c", "d"]

    def feats(folder, suffix):
        x = np.stack([im.inception_input(Image.open(folder / f"{n}{suffix}").convert("RGB")) for n in names])
        with torch.no_grad():
            return net(torch.from_numpy(x), return_features=True).double().numpy()

    a, b = feats(gen, ".png"), feats(real, ".jpg")
    assert m["fid"] == pytest.approx(_scipy_fid(a, b), rel=1e-5)
    assert m["kid"] == pytest.approx(im.kid(a, b)[0], rel=1e-6)
    assert -1 <= m["clip_i"] <= 1
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["fid"] == m["fid"] and saved["settings"]["resize"].startswith("clean")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<img") == 8 and "data:image/png;base64," in page  # 4 pairs, embedded

    # network protocol: the images at their own sizes (two sizes: batched apart), a different number
    net_m = evaluate_images(gen, real, standin_inception, tmp_path / "out2", resize="network")
    assert net_m["fid"] != pytest.approx(m["fid"]) and "network" in net_m["settings"]["resize"]


def test_without_common_names_every_image_counts(tmp_path, standin_inception):
    real = _folder(tmp_path / "real", ["r1", "r2", "r3"], 0)
    gen = _folder(tmp_path / "gen", ["g1", "g2"], 1)
    m = evaluate_images(gen, real, standin_inception, tmp_path / "out")
    assert (m["paired"], m["n_gen"], m["n_real"]) == (0, 2, 3) and "clip_i" not in m


def test_missing_or_wrong_networks_are_one_line(tmp_path, standin_inception, capsys):
    real = _folder(tmp_path / "real", ["a", "b"], 0)
    not_script = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, not_script)
    wrong = tmp_path / "wrong.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Identity()).save(str(wrong))
    for net, text in ((tmp_path / "inception-2015-12-05.pt", "fetch the TorchScript Inception-v3"),
                      (not_script, "not a TorchScript file"), (wrong, "return_features=True")):
        out = tmp_path / "out"
        assert main(["evaluate", "images", str(real), str(real), "--inception", str(net), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and text in err, err
        assert not out.exists() or not (out / "metrics.json").exists()
    with pytest.raises(InvalidInput, match="share the name"):
        evaluate_images(_folder(tmp_path / "dup", ["a"], 0, suffix=".jpg") and _folder(tmp_path / "dup", ["a"], 1),
                        real, standin_inception, tmp_path / "o")


def test_protocol_inputs_are_checked_before_anything_loads(tmp_path, standin_inception, capsys):
    import re

    from vlv.errors import UserError
    from vlv.evaluation.protocols import caption_to_image, reconstruction
    from vlv.shapes.data import write_shapes

    scenes = write_shapes(tmp_path / "scenes", n=2, seed=0, split="val", progress=False)
    dup = _folder(tmp_path / "dup", ["000000"], 0, suffix=".jpg")
    captions = tmp_path / "some.jsonl"
    captions.write_text(json.dumps({"image": "000000.png", "caption": "a small red circle"}) + "\n")
    out, net = tmp_path / "out", standin_inception
    assert main(["evaluate", "caption-to-image", str(scenes), "--pipeline", "shapes-teacher", "--model",
                 "shapes-stage2", "--inception", str(tmp_path / "no.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fetch the TorchScript Inception-v3" in err and not out.exists()
    for call, text in (
            (lambda: caption_to_image([scenes], out, tmp_path, net, model="shapes-stage2"),
             "not a diffusers pipeline dir"),
            (lambda: caption_to_image([scenes], out, "shapes-teacher", net, model=tmp_path), "not a VLV captioner"),
            (lambda: caption_to_image([scenes], out, "shapes-teacher", net, captions=captions),
             "no caption for 1 of 2 image(s) (first 000001.png)"),
            (lambda: caption_to_image([scenes], out, "shapes-teacher", net, model="shapes-stage2", cfg=[-1]),
             "give one or more scales >= 0"),
            (lambda: caption_to_image([scenes, dup], out, "shapes-teacher", net, model="shapes-stage2"),
             "share the name '000000'"),
            (lambda: reconstruction([scenes], out, "shapes-stage1", tmp_path, net), "not a diffusers pipeline dir")):
        with pytest.raises((UserError, FileNotFoundError), match=re.escape(text)):
            call()
        assert not out.exists()


def test_the_old_shapes_form_names_the_new_one(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--run", "runs/demo", "--n", "5"])
    assert stop.value.code == 2
    assert "vlv evaluate shapes --run runs/demo" in capsys.readouterr().err
