"""The package's layers: imports run one way, core -> training / inference -> shapes / evaluation, api, cli.

Read from the source (every import, at module level or inside a function), so a late import cannot hide.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "vlv"
CORE = ("data", "modeling", "config", "diffusion", "text_encoder", "encoder", "decoder", "decoders", "lm",
        "captioner", "shipped", "version", "errors", "checks", "progress")
# module (or package) -> what it may not import
FORBIDDEN = {**{m: ("vlv.shapes", "vlv.training", "vlv.inference", "vlv.api", "vlv.cli") for m in CORE},
             "inference": ("vlv.shapes", "vlv.training", "vlv.api", "vlv.cli"),
             "training": ("vlv.shapes", "vlv.inference", "vlv.api", "vlv.cli"),
             "shapes": ("vlv.api", "vlv.cli"),
             "evaluation": ("vlv.shapes", "vlv.training", "vlv.api", "vlv.cli"),
             "official": ("vlv.shapes", "vlv.training", "vlv.inference", "vlv.api", "vlv.cli"),
             # helpers for tests and benchmarks: they run the command line from outside, as a user does
             "testing": ("vlv.shapes", "vlv.training", "vlv.inference", "vlv.api", "vlv.cli")}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _files(name: str) -> list[Path]:
    return sorted((PACKAGE / name).rglob("*.py")) if (PACKAGE / name).is_dir() else [PACKAGE / f"{name}.py"]


def test_every_module_is_in_a_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert top - {"__init__", "api", "cli"} == set(FORBIDDEN)


def test_imports_run_one_way():
    bad = []
    for name, forbidden in FORBIDDEN.items():
        for path in _files(name):
            bad += [f"{path.relative_to(PACKAGE)} imports {imp}" for imp in _imports(path)
                    if any(imp == f or imp.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_one_definition_of_the_diffusion_loss():
    """The stage-1 loss is vlv.diffusion.diffusion_loss; nothing else in the package draws the target."""
    users = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if "get_velocity" in p.read_text()
             or ".add_noise(" in p.read_text()]
    assert users == [Path("diffusion.py")]


def test_every_progress_bar_is_vlv_progress():
    """vlv draws its bars through vlv.progress.tqdm, so --quiet (vlv.progress.no_bars) turns every one off."""
    users = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if any(name == "tqdm" or name.startswith("tqdm.") for name in _imports(p))]
    assert users == ["progress.py"]


def test_the_command_line_and_the_configs_load_no_torch():
    """Flags are built from the config dataclasses, so those modules must stay free of torch."""
    code = ("import sys, vlv, vlv.cli; vlv.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_public_names_at_the_top():
    import vlv
    from vlv.captioner import Captioner
    from vlv.decoder import DiffusionDecoder
    from vlv.encoder import VLVEncoder

    assert (vlv.VLVEncoder, vlv.DiffusionDecoder, vlv.Captioner) == (VLVEncoder, DiffusionDecoder, Captioner)
    assert {"EncoderConfig", "CaptionerConfig", "TrainConfig"} <= set(vlv.__all__)
