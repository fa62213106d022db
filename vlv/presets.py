"""Named weights shipped inside the package, resolved separately from architectures."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED = {"shapes-teacher": WEIGHTS / "shapes-teacher"}


def list_presets() -> list[str]:
    return sorted(SHIPPED)


def resolve_decoder(name_or_path: str | Path) -> Path:
    """A shipped name (``shapes-teacher``) or a Stable-Diffusion-layout dir -> its path."""
    if str(name_or_path) in SHIPPED:
        path = SHIPPED[str(name_or_path)]
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"the shipped weights {name_or_path!r} are not in this install ({path})")
        return path
    path = Path(name_or_path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a Stable Diffusion dir (no model_index.json) nor a preset "
                                f"({', '.join(list_presets())})")
    return path
