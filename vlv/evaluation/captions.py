"""Caption metrics as coco-caption defines them: BLEU-1..4, ROUGE-L and CIDEr-D from pycocoevalcap's scorers.

Predictions are ``vlv caption``'s rows (``{"image", "caption"}``); references a COCO caption annotation file or a
jsonl of ``{"image", "captions": [...]}`` (or vlv's own ``{"image", "caption"}`` rows, one reference each). Rows
are matched by image path; a shorter path matches a longer one that ends with it (``x.jpg`` and ``val2014/x.jpg``).

Tokenisation decides the numbers. With ``java`` on the PATH, coco-caption's own: the Stanford PTB tokenizer
(pycocoevalcap's ``PTBTokenizer``), then METEOR, and SPICE where its CoreNLP jars are installed. Without it,
:func:`python_tokenize`, which reproduces the PTB tokenizer's output on ordinary captions (lower case, clitics split
as ``is n't`` / ``cat 's``, coco-caption's punctuation list dropped, numbers like ``3.5``, ``1,000`` and ``10:30``
and hyphenated words kept whole, brackets written ``-lrb-``) and differs on what PTB knows by rule lists: it keeps the
period of only a few abbreviations (mr mrs ms dr st jr sr vs mt ft etc, and dotted ones like ``u.s.``), drops the
quote of ``'n'`` and ``'90s``, and keeps a trailing hyphen (``cat-``). pycocoevalcap's ``Cider`` is CIDEr-D (the
Gaussian length penalty, clipped counts); its document frequencies come from the references of the evaluated images.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from vlv.checks import read_json
from vlv.errors import InvalidInput

EXTRA = "pip install 'vlv[eval]'"
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "mt", "ft", "etc"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Applied in order to the lower-cased text, as the PTB tokenizer's rules fire.
_RULES: list[tuple[re.Pattern, Any]] = [
    (re.compile("[\u201c\u201d\"`]"), " "),  # double quotes become `` and '', both dropped
    (re.compile("[\u2018\u2019]"), "'"),
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m[0]]} "),
    (re.compile(r"\.\.\.+|--+"), " "),
    (re.compile(r"[?!]+"), r" \g<0> "),
    (re.compile(r";|(?<!\d)[,:]|[,:](?!\d)"), " "),  # kept inside numbers: 1,000 and 10:30
    (re.compile(r"[$%#]"), r" \g<0> "),
    (re.compile(r"\b(can)(not)\b|\b(gon|got|wan)(na|ta)\b"), lambda m: " ".join(g for g in m.groups() if g)),
    (re.compile(r"(?<=\w)(n't|'s|'m|'d|'ll|'re|'ve)\b"), r" \1"),
]
_OPENING_QUOTE = re.compile(r"(^|\s)'(?!(s|m|d|ll|re|ve)\b)")
_CLOSING_QUOTE = re.compile(r"(?<=\S)'(\s|$)")


@functools.cache
def _coco():
    """pycocoevalcap's scorers, or one line saying how to install them."""
    try:
        import pycocoevalcap.bleu.bleu as bleu
        import pycocoevalcap.cider.cider as cider
        import pycocoevalcap.rouge.rouge as rouge
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        raise InvalidInput(f"caption metrics need pycocoevalcap, which is not installed: {EXTRA}") from None
    return bleu.Bleu, rouge.Rouge, cider.Cider, ptb


def check_scorers() -> None:
    _coco()


def java_available() -> bool:
    return shutil.which("java") is not None


# ----------------------------------------------------------------------------------------- tokenising
def _period(token: str) -> str:
    """A sentence's final period splits off; an abbreviation's stays (PTB's rule, with a short list)."""
    if len(token) > 1 and token.endswith(".") and "." not in token[:-1] and token[:-1] not in ABBREVIATIONS:
        return token[:-1] + " ."
    return token


def python_tokenize(text: str) -> str:
    """coco-caption's tokenisation (PTB, lower case, punctuation dropped) in Python; the module doc says where it
    differs from the Java tokenizer."""
    _, _, _, ptb = _coco()
    text = text.lower()
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    text = " ".join(_period(t) for t in text.split())
    text = _CLOSING_QUOTE.sub(r" '\1", _OPENING_QUOTE.sub(r"\1' ", text))
    return " ".join(t for t in text.split() if t not in ptb.PUNCTUATIONS)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The Java tools print progress on the stderr they inherit; a command shows only its own lines."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tokenize(captions: dict[str, list[str]], java: bool) -> dict[str, list[str]]:
    """Each image's captions tokenised: by the PTB tokenizer (Java) or :func:`python_tokenize`."""
    if not java:
        return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}
    _, _, _, ptb = _coco()
    with _quiet_stderr():
        out = ptb.PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
        raise RuntimeError("the PTB tokenizer returned fewer lines than it was given")
    return out


# ------------------------------------------------------------------------------------------ the files
def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{where}: not a JSON row ({e})") from None
            if not isinstance(row, dict):
                raise InvalidInput(f"{where}: a row must be a JSON object")
            yield where, row


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: \"{key}\" must be a string, got {json.dumps(value)[:40]}")
    return value


def image_key(name: str) -> str:
    """An image name as a normalised relative path (``./a\\b.jpg`` -> ``a/b.jpg``)."""
    return str(PurePosixPath(name.replace("\\", "/")))


def read_predictions(path: str | Path) -> dict[str, str]:
    """``vlv caption``'s output: image key -> caption, in file order; an image captioned twice is refused."""
    path, out = Path(path), {}
    for where, row in _jsonl(path):
        key = image_key(_text(row, "image", where))
        if key in out:
            raise InvalidInput(f"{where}: {key} is captioned twice")
        out[key] = _text(row, "caption", where)
    if not out:
        raise InvalidInput(f"{path}: no predicted captions")
    return out


def read_references(path: str | Path) -> dict[str, list[str]]:
    """image key -> reference captions, from a COCO annotation file (.json) or a jsonl of ``{"image", "captions"}``
    (or ``{"image", "caption"}``: rows of one image add up)."""
    path = Path(path)
    refs: dict[str, list[str]] = defaultdict(list)
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
            raise InvalidInput(f"{path}: not a COCO caption annotation file (it needs \"images\" and "
                               "\"annotations\" lists)")
        try:
            names = {im["id"]: image_key(im["file_name"]) for im in data["images"]}
            for a in data["annotations"]:
                refs[names[a["image_id"]]].append(str(a["caption"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise InvalidInput(f"{path}: a COCO image or annotation lacks {e} (images need id and file_name, "
                               "annotations image_id and caption)") from None
    else:
        for where, row in _jsonl(path):
            key = image_key(_text(row, "image", where))
            if "captions" in row:
                caps = row["captions"]
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    raise InvalidInput(f"{where}: \"captions\" must be a list of strings")
                refs[key] += caps
            else:
                refs[key].append(_text(row, "caption", where))
    refs = {k: v for k, v in refs.items() if v}
    if not refs:
        raise InvalidInput(f"{path}: no reference captions")
    return refs


def _is_tail(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    short, long = sorted((a, b), key=len)
    return long[len(long) - len(short):] == short


def match_names(wanted: list[str], available: list[str]) -> tuple[dict[str, str], list[str]]:
    """(wanted key -> available key, wanted keys without one): the same path, else the one available path that
    ends with it or that it ends with. A key matching several, or two keys matching one, is refused."""
    have = set(available)
    by_name: dict[str, list[str]] = defaultdict(list)
    for r in available:
        by_name[PurePosixPath(r).name].append(r)
    out: dict[str, str] = {}
    used: dict[str, str] = {}
    missing = []
    for k in wanted:
        if k in have:
            hits = [k]
        else:
            parts = PurePosixPath(k).parts
            hits = [r for r in by_name.get(PurePosixPath(k).name, []) if _is_tail(parts, PurePosixPath(r).parts)]
        if not hits:
            missing.append(k)
            continue
        if len(hits) > 1:
            raise InvalidInput(f"image {k} matches {len(hits)} images ({hits[0]}, {hits[1]}): name the images by "
                               "longer paths")
        if hits[0] in used:
            raise InvalidInput(f"images {used[hits[0]]} and {k} both match the image {hits[0]}")
        used[hits[0]] = k
        out[k] = hits[0]
    return out, missing


def match_references(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, list[str]]:
    """The references of each predicted image (matched by :func:`match_names`); one without any is refused."""
    matched, missing = match_names(list(preds), list(refs))
    if missing:
        raise InvalidInput(f"{len(missing)} of {len(preds)} predicted image(s) have no reference captions "
                           f"(first {missing[0]})")
    return {k: refs[r] for k, r in matched.items()}


# ------------------------------------------------------------------------------------------ the scores
def _spice_jars() -> Path | None:
    """SPICE's CoreNLP jars, where pycocoevalcap's downloader would put them (vlv never downloads them)."""
    import pycocoevalcap.spice.get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    jars = [lib / f"{models.JAR}.jar", lib / f"{models.JAR}-models.jar"]
    return lib if all(j.is_file() for j in jars) else None


def coco_scores(preds: dict[str, str], refs: dict[str, list[str]], java: bool
                ) -> tuple[dict[str, float], dict[str, dict[str, float]], list[str]]:
    """(corpus scores, per-image scores, notes) of matched predictions and references (the same keys).

    Keys: bleu1..bleu4, rouge_l, cider, and with Java meteor and (its jars installed) spice.
    """
    if java and not java_available():
        raise InvalidInput("Java was asked for, but there is no java on the PATH")
    Bleu, Rouge, Cider, _ = _coco()
    gts = tokenize(refs, java)
    res = tokenize({k: [v] for k, v in preds.items()}, java)
    scores, per_image, notes = {}, {k: {} for k in preds}, []
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores[f"bleu{n + 1}"] = float(bleu[n])
    for name, scorer in (("rouge_l", Rouge()), ("cider", Cider())):
        score, each = scorer.compute_score(gts, res)
        scores[name] = float(score)
        for k, s in zip(gts, each, strict=True):
            per_image[k][name] = float(s)
    for k, s in zip(gts, bleu_each[3], strict=True):
        per_image[k]["bleu4"] = float(s)
    if not java:
        why = "no java on the PATH" if not java_available() else "Java not used"
        notes.append(f"{why}: pure-Python PTB-style tokenisation, no METEOR or SPICE")
        return scores, per_image, notes
    scores.update(_java_scores(gts, res, notes))
    return scores, per_image, notes


def _java_scores(gts: dict[str, list[str]], res: dict[str, list[str]], notes: list[str]) -> dict[str, float]:
    """METEOR, and SPICE when its jars are installed; a Java tool that fails is a note, not the end of the run."""
    import subprocess

    from pycocoevalcap.meteor.meteor import Meteor

    out = {}
    try:
        with _quiet_stderr():
            meteor = Meteor()
            out["meteor"] = float(meteor.compute_score(gts, res)[0])
            del meteor
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        notes.append(f"METEOR failed ({type(e).__name__}: {e})")
    if _spice_jars() is None:
        notes.append("SPICE skipped: it needs Stanford CoreNLP 3.6.0 beside pycocoevalcap's SPICE jar "
                     "(fetched by pycocoevalcap/spice/get_stanford_models.py; vlv never downloads)")
        return out
    from pycocoevalcap.spice.spice import Spice

    try:
        with _quiet_stderr():
            out["spice"] = float(Spice().compute_score(gts, res)[0])
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        notes.append(f"SPICE failed ({type(e).__name__}: {e})")
    return out
