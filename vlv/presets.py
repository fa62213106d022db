"""Named weights shipped inside the package, resolved separately from architectures.

``shapes-teacher`` is a Stable-Diffusion-layout dir; ``shapes-stage1`` a stage-1 run (``encoder.json`` +
safetensors), so ``--decoder`` / ``--encoder`` take a name wherever they take a dir.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED = {"shapes-teacher": WEIGHTS / "shapes-teacher", "shapes-stage1": WEIGHTS / "shapes-stage1"}
MARKER = {"shapes-teacher": "model_index.json", "shapes-stage1": "encoder.json"}


def list_presets() -> list[str]:
    return sorted(SHIPPED)


def _shipped(name: str) -> Path:
    path = SHIPPED[name]
    if not (path / MARKER[name]).exists():
        raise FileNotFoundError(f"the shipped weights {name!r} are not in this install ({path})")
    return path


def resolve_decoder(name_or_path: str | Path) -> Path:
    """A shipped name (``shapes-teacher``) or a Stable-Diffusion-layout dir -> its path."""
    if str(name_or_path) == "shapes-teacher":
        return _shipped("shapes-teacher")
    path = Path(name_or_path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a Stable Diffusion dir (no model_index.json) nor the shipped "
                                f"'shapes-teacher'")
    return path


def resolve_encoder(name_or_path: str | Path) -> Path:
    """A shipped name (``shapes-stage1``) or a stage-1 run dir (with encoder.json) -> its path."""
    if str(name_or_path) == "shapes-stage1":
        return _shipped("shapes-stage1")
    path = Path(name_or_path)
    if not (path / "encoder.json").exists():
        raise FileNotFoundError(f"no VLV encoder at {path} (no encoder.json) nor the shipped 'shapes-stage1'")
    return path
