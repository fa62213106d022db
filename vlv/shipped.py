"""Named weights shipped inside the package, resolved separately from architectures.

``shapes-teacher`` is a Stable-Diffusion-layout dir, ``shapes-teacher-sd3`` an SD3-layout one (the second teacher,
``vlv.shapes.teacher_sd3``); ``shapes-florence2`` a native Florence-2 dir (pre-trained on
shapes detection, ``vlv.shapes.florence2``); ``shapes-stage1`` a stage-1 run (``encoder.json`` +
safetensors); ``shapes-lm`` the pre-trained shapes LM (transformers layout); ``shapes-stage2`` a stage-2 run
whose ``captioner.json`` names the other three by these names. Wherever a command takes one of these dirs it
also takes the name, so the shipped chain works from any install location.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
# name -> (dir, the file that marks a complete dir)
SHIPPED = {"shapes-teacher": (WEIGHTS / "shapes-teacher", "model_index.json"),
           "shapes-teacher-sd3": (WEIGHTS / "shapes-teacher-sd3", "model_index.json"),
           "shapes-florence2": (WEIGHTS / "shapes-florence2", "config.json"),
           "shapes-stage1": (WEIGHTS / "shapes-stage1", "encoder.json"),
           "shapes-lm": (WEIGHTS / "shapes-lm", "config.json"),
           "shapes-stage2": (WEIGHTS / "shapes-stage2", "captioner.json")}
TEACHERS = ("shapes-teacher", "shapes-teacher-sd3")  # the shipped diffusers dirs, one per decoder family
# The sections a run dir's marker must hold (what from_pretrained reads first).
MARKER_SECTIONS = {"shapes-stage1": ("config",), "shapes-stage2": ("config",)}


def list_shipped() -> list[str]:
    return sorted(SHIPPED)


def installed(name: str) -> bool:
    """Whether this install holds the shipped weights ``name`` (they are shipped one by one)."""
    path, marker = SHIPPED[name]
    return (path / marker).exists()


def shipped_dir(name: str) -> Path:
    """The dir of shipped weights ``name``; FileNotFoundError when this install lacks them."""
    if not installed(name):
        raise FileNotFoundError(f"the shipped weights {name!r} are not in this install ({SHIPPED[name][0]})")
    return SHIPPED[name][0]


def _resolve(name_or_path: str | Path, name: str, what: str) -> Path:
    """The dir, checked before anything loads: complete, and every safetensors file in it reads."""
    from vlv.checks import check_name_or_path, check_sd_dir, check_weights_in, read_json

    path = Path(name_or_path)
    if str(name_or_path) == name:
        check_name_or_path(name, [name], "shipped weights")
        path = shipped_dir(name)
    elif not (path / SHIPPED[name][1]).exists():
        raise FileNotFoundError(f"{path} is not {what} (no {SHIPPED[name][1]}) nor the shipped {name!r}")
    if name in TEACHERS:
        return check_sd_dir(path)
    read_json(path / SHIPPED[name][1], keys=MARKER_SECTIONS.get(name, ()))  # torn or edited: one line, now
    check_weights_in(path)
    return path


def resolve_decoder(name_or_path: str | Path) -> Path:
    """A shipped teacher's name (``shapes-teacher``, ``shapes-teacher-sd3``) or a complete diffusers dir of a family
    vlv takes -> its path."""
    name = str(name_or_path) if str(name_or_path) in TEACHERS else "shapes-teacher"
    return _resolve(name_or_path, name, "a diffusers pipeline dir")


def resolve_encoder(name_or_path: str | Path) -> Path:
    """A shipped name (``shapes-stage1``) or a stage-1 run dir (with encoder.json) -> its path."""
    return _resolve(name_or_path, "shapes-stage1", "a VLV encoder")


def resolve_stage2(name_or_path: str | Path) -> Path:
    """A shipped name (``shapes-stage2``) or a captioner dir (with captioner.json) -> its path."""
    return _resolve(name_or_path, "shapes-stage2", "a VLV captioner")


def resolve_florence2_name(source: str | dict) -> str | dict:
    """``shapes-florence2`` -> its shipped dir (as a string); any other Florence-2 source unchanged."""
    return str(shipped_dir("shapes-florence2")) if source == "shapes-florence2" else source


def resolve_lm_name(source: str | dict) -> str | dict:
    """``shapes-lm`` -> its shipped dir (as a string); any other LM source (dir, config stem, dict) unchanged."""
    return str(shipped_dir("shapes-lm")) if source == "shapes-lm" else source


def is_shipped(name_or_path: str | Path) -> bool:
    return str(name_or_path) in SHIPPED
