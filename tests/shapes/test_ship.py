"""scripts/ship.py, the maintainer tool that swaps a finished run in as shipped weights: re-shipping a run
warm-started from the shipped weights themselves must keep their training record and (when asked) the
ablations measured beside them, since the swap deletes the old dir."""

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_spec = importlib.util.spec_from_file_location("ship", Path(__file__).parents[2] / "scripts" / "ship.py")
ship = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ship)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))


def test_reship_from_shipped_init_keeps_record_and_ablations(tmp_path, monkeypatch):
    shipped = tmp_path / "weights" / "shapes-stage1"
    shipped.mkdir(parents=True)
    old_record = {"command": "vlv train stage1 --first", "steps": 10, "history": [{"step": 10, "loss": 0.1}]}
    _write_json(shipped / "training.json", old_record)
    _write_json(shipped / "metrics.json", {"reconstruction": {"scene_accuracy": 0.5},
                                           "ablations": {"nq": {"note": "3 runs", "results": {"16": {}}}}})
    monkeypatch.setattr(ship, "SHIPPED", {"shapes-stage1": (shipped, "encoder.json")})

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    _write_json(run / "encoder.json", {"preset": "shapes"})
    _write_json(run / "stage1.json", {"settings": {"init": "shapes-stage1"}})
    _write_json(run / "checkpoint" / "trainer.json",
                {"step": 20, "elapsed_s": 3.0, "config": {"lr": 5e-4}, "history": []})
    save_file({"q": torch.ones(2, 3)}, run / "model.safetensors")
    save_file({"lat": torch.ones(1)}, run / "latents.safetensors")

    ship.ship("stage1", run, "vlv train stage1 --init shapes-stage1", None, init_note="CPU",
              keep_ablations="measured on the previous weights")

    record = json.loads((shipped / "training.json").read_text())
    assert record["steps"] == 20 and record["init"]["command"] == old_record["command"]
    assert record["init"]["history"] == old_record["history"] and record["init"]["note"] == "CPU"
    metrics = json.loads((shipped / "metrics.json").read_text())
    assert "reconstruction" not in metrics  # the old numbers belong to the old weights
    assert metrics["ablations"]["nq"] == {"note": "3 runs [measured on the previous weights]", "results": {"16": {}}}
    assert load_file(shipped / "model.safetensors")["q"].dtype == torch.float16
    assert not (shipped / "latents.safetensors").exists() and not (shipped / "checkpoint").exists()


def test_accuracy_curve_lays_warm_started_phases_end_to_end():
    from vlv.shapes.evaluate import accuracy_curve

    first = {"command": "a", "steps": 100, "wall_s": 120.0,
             "history": [{"step": 50, "loss": 1.0, "elapsed_s": 60.0},
                         {"eval": {"recon_scene_accuracy": 0.1, "elapsed_s": 120.0}}]}
    second = {"command": "b", "steps": 10, "wall_s": 60.0, "note": "cpu", "init": first,
              "history": [{"eval": {"recon_scene_accuracy": 0.4, "elapsed_s": 30.0}}]}
    last = {"command": "c", "steps": 5, "wall_s": 30.0, "init": second,
            "history": [{"eval": {"recon_scene_accuracy": 0.5, "elapsed_s": 30.0}}]}
    curve = accuracy_curve(last)
    assert curve["points"] == [[2.0, 0.1], [2.5, 0.4], [3.5, 0.5]]  # minutes since the first phase began
    assert [p["command"] for p in curve["phases"]] == ["a", "b", "c"] and curve["phases"][1]["note"] == "cpu"
