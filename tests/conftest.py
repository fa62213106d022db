import os

import pytest

# Tiny models: one thread per process beats two (thread overhead dominates; 2-core CI machine). Set before
# torch is imported (this file loads before any test module), so torch.get_num_threads() is 1 in every test and
# CLI and torchrun subprocesses inherit it; a value set outside is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from vlv.shapes.data import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    return {split: write_shapes(root / split, n=n, seed=0, split=split, progress=False)
            for split, n in (("train", 48), ("val", 6))}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, shapes_data):
    """A tiny shapes teacher trained for a few steps: real SD layout, seconds to build."""
    from vlv.shapes.config import TINY, teacher_recipe
    from vlv.shapes.teacher import train_teacher

    recipe = teacher_recipe(vae={"steps": 4, "batch_size": 8},
                            unet={"steps": 4, "batch_size": 8, "warmup_steps": 0, "eval_every": 0})
    out = train_teacher(shapes_data["train"], tmp_path_factory.mktemp("teacher") / "t", TINY, recipe, progress=False)
    assert out is not None
    return out
