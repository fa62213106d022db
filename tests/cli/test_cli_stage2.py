import json

from vlv.data.records import read_records


def test_cli_lm_stage2_caption(tiny_teacher, shapes_data, tmp_path, cli):
    train, val = shapes_data["train"], shapes_data["val"]
    assert cli("train", "stage1", "--decoder", tiny_teacher, "--data", train, "--out", tmp_path / "s1", "--nq", 8,
               "--steps", 2, "--batch-size", 3)[0] == 0
    assert cli("train", "lm", "--data", train, "--out", tmp_path / "lm", "--steps", 3, "--batch-size", 4)[0] == 0
    assert cli("train", "stage2", "--encoder", tmp_path / "s1", "--lm", tmp_path / "lm",  # s1's own decoder
               "--data", train, "--out", tmp_path / "s2", "--steps", 2, "--batch-size", 3, "--lora-rank", 4)[0] == 0
    assert json.loads((tmp_path / "s2" / "stage2.json").read_text())["settings"]["decoder"] == str(tiny_teacher)
    assert json.loads((tmp_path / "s2" / "captioner.json").read_text())["config"]["lora_rank"] == 4
    assert cli("caption", val, "--model", tmp_path / "s2", "--out", tmp_path / "caps.jsonl", "--num-beams", 1,
               "--max-new-tokens", 12, "--batch-size", 4)[0] == 0
    rows = [json.loads(x) for x in (tmp_path / "caps.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == [rec.image for rec in read_records(val)]
    assert all(isinstance(row["caption"], str) for row in rows)
    # The refusals (no model loads before them), each its own one line.
    for argv, word in ((["caption", val, "--model", tmp_path / "nothing", "--out", tmp_path / "x.jsonl"], ""),
                       (["train", "stage2", "--encoder", tmp_path / "nothing", "--lm", tmp_path / "lm", "--decoder",
                         tiny_teacher, "--data", train, "--out", tmp_path / "s3"], ""),
                       (["train", "stage2", "--encoder", tmp_path / "s1", "--lm", tmp_path / "lm", "--decoder",
                         tiny_teacher, "--data", train, "--out", tmp_path / "s4", "--trainable", "mlp",
                         "--lora-rank", 4], "LoRA"),
                       (["train", "stage2", "--encoder", tmp_path / "s1", "--lm", tmp_path / "lm", "--decoder",
                         tiny_teacher, "--data", train, "--out", tmp_path / "s5", "--trainable", "mlp+llm+encoder",
                         "--cache-text-embeds"], "mlp+llm+encoder")):
        code, err = cli(*argv)
        assert code == 2
        assert word in err and len(err.strip().splitlines()) == 1, err
