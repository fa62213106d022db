"""`vlv evaluate captions`: the numbers are pycocoevalcap's scorers' on the same rows, rows are matched to references
by image path, and the pure-Python tokenisation gives what the PTB tokenizer gives on the fixture captions."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlv.cli import main
from vlv.errors import InvalidInput
from vlv.evaluation import captions as cap
from vlv.evaluation.jobs import evaluate_captions

pytest.importorskip("pycocoevalcap")

# The Stanford PTB tokenizer's output (coco-caption's call: -preserveLines -lowerCase, then its punctuation dropped),
# recorded from pycocoevalcap 1.2's PTBTokenizer under OpenJDK 17.
PTB = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Two dogs playing in the snow, one is brown.": "two dogs playing in the snow one is brown",
    "The cat's bowl isn't empty!": "the cat 's bowl is n't empty",
    "A black-and-white photo of a train (old).": "a black-and-white photo of a train -lrb- old -rrb-",
    "People don't wait at the bus stop; they're late...": "people do n't wait at the bus stop they 're late",
    "A \"vintage\" car parked near 3.5 meters of fence, 1,000 bricks.":
        "a vintage car parked near 3.5 meters of fence 1,000 bricks",
    "Kids' toys on a table: a ball, a doll -- and a kite?": "kids toys on a table a ball a doll and a kite",
    "A T-shirt that says 'hello world'.": "a t-shirt that says hello world",
    "There are 2 giraffes & 1 zebra at the zoo.": "there are 2 giraffes & 1 zebra at the zoo",
    "Mr. Smith walks his dog.": "mr. smith walks his dog",
    "A plate with $5 pizza and 50% off coupon": "a plate with $ 5 pizza and 50 % off coupon",
    "  Spaces   everywhere  ": "spaces everywhere",
    "U.S. flag on a pole": "u.s. flag on a pole",
    "I'm sure we'll see; you'd agree they've won.": "i 'm sure we 'll see you 'd agree they 've won",
    "An outdoor cafe/bar with [tables] and {chairs}":
        "an outdoor cafe/bar with -lsb- tables -rsb- and -lcb- chairs -rcb-",
    "Cannot believe it's 10:30 already!!": "can not believe it 's 10:30 already !!",
    "a cat on a mat.The end": "a cat on a mat.the end",
    "The #1 player at 5pm": "the # 1 player at 5pm",
    "It\u2019s a dog\u2019s life": "it 's a dog 's life",
    "Cars,trucks and buses.": "cars trucks and buses",
    "A 4x4 truck on St. Louis street.": "a 4x4 truck on st. louis street",
    "It's five o'clock.": "it 's five o'clock",
    "a cat, etc.": "a cat etc.",
    "Ready?!": "ready ?!",
    "A plane in the sky .": "a plane in the sky",
    "cannot gonna wanna": "can not gon na wan na",
}

# A small captioning set: three images (named with folders on one side or the other), five references each.
REFS = {
    "val2014/COCO_val2014_000000000042.jpg": [
        "A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.", "Surfer catching a wave at the beach.",
        "A man surfing on a blue wave."],
    "val2014/COCO_val2014_000000000073.jpg": [
        "Two dogs playing in the snow.", "A pair of dogs run through the snow.", "Dogs playing outside in winter.",
        "Two brown dogs in a snowy field.", "Two dogs are chasing each other in the snow."],
    "COCO_val2014_000000000074.jpg": [
        "A black-and-white photo of an old train.", "An old steam train at a station.",
        "A vintage train parked on the tracks.", "A train engine on a railway.", "A black and white train photo."],
}
PREDS = {"COCO_val2014_000000000042.jpg": "A man riding a wave on a surfboard.",
         "./val2014/COCO_val2014_000000000073.jpg": "Two dogs playing in the snow, one is brown.",
         "images/COCO_val2014_000000000074.jpg": "An old train (black-and-white) at a station!"}
KEYS = {"COCO_val2014_000000000042.jpg": "val2014/COCO_val2014_000000000042.jpg",
        "./val2014/COCO_val2014_000000000073.jpg": "val2014/COCO_val2014_000000000073.jpg",
        "images/COCO_val2014_000000000074.jpg": "COCO_val2014_000000000074.jpg"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _coco_file(path):
    images = [{"id": i, "file_name": name} for i, name in enumerate(REFS)]
    annotations = [{"id": 10 * i + j, "image_id": i, "caption": c} for i, name in enumerate(REFS)
                   for j, c in enumerate(REFS[name])]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture
def fixture_files(tmp_path):
    pred = _jsonl(tmp_path / "captions.jsonl", [{"image": k, "caption": v} for k, v in PREDS.items()])
    coco = _coco_file(tmp_path / "captions_val2014.json")
    jsonl = _jsonl(tmp_path / "refs.jsonl", [{"image": k, "captions": v} for k, v in REFS.items()])
    return pred, coco, jsonl


def _direct(java: bool) -> dict[str, float]:
    """pycocoevalcap's scorers called as coco-caption's COCOEvalCap calls them, on the hand-matched rows."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in REFS[KEYS[p]]] for i, p in enumerate(PREDS)}
    res = {i: [{"caption": PREDS[p]}] for i, p in enumerate(PREDS)}
    if java:
        gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        gts = {i: [cap.python_tokenize(c["caption"]) for c in v] for i, v in gts.items()}
        res = {i: [cap.python_tokenize(c["caption"]) for c in v] for i, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {**{f"bleu{n + 1}": bleu[n] for n in range(4)}, "rouge_l": Rouge().compute_score(gts, res)[0],
            "cider": Cider().compute_score(gts, res)[0]}


def test_python_tokenisation_gives_the_ptb_tokenizers_output():
    assert {s: cap.python_tokenize(s) for s in PTB} == PTB


@pytest.mark.skipif(not cap.java_available(), reason="no java: the PTB tokenizer cannot run")
def test_the_recorded_ptb_output_is_the_tokenizers():
    assert cap.tokenize({s: [s] for s in PTB}, java=True) == {s: [t] for s, t in PTB.items()}


def test_scores_equal_pycocoevalcaps_on_both_reference_formats(fixture_files, tmp_path, monkeypatch, capsys):
    pred, coco, jsonl = fixture_files
    want = _direct(java=False)
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)  # a machine without Java
    for refs in (coco, jsonl):
        m = evaluate_captions(pred, refs, tmp_path / refs.stem)
        assert {k: m[k] for k in want} == want
        assert m["n"] == 3 and "meteor" not in m and "clipscore" not in m
    assert want["cider"] > 0.5 and 0 < want["bleu4"] < want["bleu1"] < 1  # a non-trivial fixture
    saved = json.loads((tmp_path / "refs" / "metrics.json").read_text())
    assert {k: saved[k] for k in want} == want and saved["settings"]["tokenizer"].startswith("pure-Python")
    assert "CIDEr-D" in saved["settings"]["cider"] and (tmp_path / "refs" / "report.html").is_file()
    said = capsys.readouterr().out.splitlines()
    assert said == ["note: no java on the PATH: pure-Python PTB-style tokenisation, no METEOR or SPICE"] * 2


@pytest.mark.slow  # METEOR's Java start-up loads its paraphrase table: ~20 s
@pytest.mark.skipif(not cap.java_available(), reason="no java")
def test_with_java_the_ptb_tokenizer_and_meteor_run(fixture_files, tmp_path):
    pred, coco, _ = fixture_files
    want = _direct(java=True)
    m = evaluate_captions(pred, coco, tmp_path / "java")
    assert {k: m[k] for k in want} == want
    assert 0 < m["meteor"] < 1 and m["settings"]["tokenizer"] == "PTB (Java)"


def test_rows_match_references_by_path():
    refs = {"a.jpg": ["x"], "val/b.jpg": ["y"], "c/d.jpg": ["z"], "e/d.jpg": ["w"]}
    got = cap.match_references({"a.jpg": "", "b.jpg": "", "c/d.jpg": ""}, refs)
    assert got == {"a.jpg": ["x"], "b.jpg": ["y"], "c/d.jpg": ["z"]}
    assert cap.match_references({"x/val/b.jpg": "", "sub/a.jpg": ""}, refs) == {"x/val/b.jpg": ["y"],
                                                                              "sub/a.jpg": ["x"]}
    with pytest.raises(InvalidInput, match="matches 2 images"):
        cap.match_references({"d.jpg": ""}, refs)
    with pytest.raises(InvalidInput, match="1 of 2 predicted image"):
        cap.match_references({"a.jpg": "", "other/b.jpg": ""}, refs)
    with pytest.raises(InvalidInput, match="both match"):
        cap.match_references({"b.jpg": "", "val/b.jpg": ""}, refs)


def test_bad_files_are_one_line_errors(fixture_files, tmp_path, capsys):
    pred, coco, _ = fixture_files
    twice = _jsonl(tmp_path / "twice.jsonl", [{"image": "a.jpg", "caption": "x"}, {"image": "./a.jpg",
                                                                                    "caption": "y"}])
    not_coco = tmp_path / "other.json"
    not_coco.write_text(json.dumps({"images": []}))
    unmatched = _jsonl(tmp_path / "unmatched.jsonl", [{"image": "zebra.jpg", "caption": "x"}])
    for args, text in (([twice, "--refs", coco], "captioned twice"),
                       ([pred, "--refs", not_coco], "not a COCO caption annotation file"),
                       ([unmatched, "--refs", coco], "1 of 1 predicted image(s) have no reference captions"),
                       ([pred, "--refs", tmp_path / "nothing.json"], "no such references file"),
                       ([pred, "--refs", coco, "--clip", tmp_path], "not a CLIP model dir")):
        out = tmp_path / "out"
        assert main(["evaluate", "captions", *map(str, args), "--out", str(out), "--no-java"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err, err
        assert not out.exists()


def test_clipscore_and_refclipscore_are_the_formulas(fixture_files, tmp_path, tiny_clip):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    pred, coco, _ = fixture_files
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(PREDS):  # found by the name as written, or by its file name
        target = images / name if i == 2 else images / name.split("/")[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(target)
    m = evaluate_captions(pred, coco, tmp_path / "clip", clip=tiny_clip, images=images, java=False)

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok, proc = AutoTokenizer.from_pretrained(tiny_clip), CLIPImageProcessorPil.from_pretrained(tiny_clip)

    def text(t):
        with torch.no_grad():
            f = model.get_text_features(**tok(["A photo depicts " + t], return_tensors="pt")).pooler_output[0]
        return f / f.norm()

    files = [images / n.split("/")[-1] for n in list(PREDS)[:2]] + [images / list(PREDS)[2]]
    cs, rcs = [], []
    for f, (name, caption) in zip(files, PREDS.items(), strict=True):
        with torch.no_grad():
            v = model.get_image_features(**proc(images=[Image.open(f).convert("RGB")], return_tensors="pt"))
        v = v.pooler_output[0] / v.pooler_output[0].norm()
        c = text(caption)
        s = 2.5 * max(float(v @ c), 0.0)
        best = max(float(text(r) @ c) for r in REFS[KEYS[name]])
        cs.append(s)
        rcs.append(2 * s * best / (s + best) if s + best > 0 else 0.0)
    assert m["clipscore"] == pytest.approx(np.mean(cs), abs=1e-5)
    assert m["refclipscore"] == pytest.approx(np.mean(rcs), abs=1e-5)


@pytest.mark.skipif(not cap.java_available(), reason="no java")
def test_the_java_tools_stay_quiet():
    """The PTB tokenizer's progress line goes nowhere: a command prints its own lines only."""
    code = "from vlv.evaluation.captions import tokenize; tokenize({'a': ['A dog.']}, java=True)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
