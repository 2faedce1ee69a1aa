"""vqakit compare: every strategy trains in its own process; tables and plots come out."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from vqakit.cli import main
from vqakit.experiments.compare import parse_strategies


def test_compare_frozen_lora_sweep_and_two_stage(tiny_model_args, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", *tiny_model_args, "--data.limit", "24", "--data.cache_dir", str(tmp_path / "cache"),
            "--train.epochs", "2", "--train.batch_size", "8", "--train.unfreeze_last_n", "1",
            "--strategies", "frozen,two-stage", "--lora_ranks", "2", "--out_dir", str(out)]
    main(args)
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["strategy"] for r in rows] == ["frozen", "two-stage", "lora-r2"]
    by = {r["strategy"]: r for r in rows}
    # frozen trains only fusion + head; two-stage's stage 2 trains more (the last layer of each tower)
    assert by["frozen"]["trainable_parameters"] < by["two-stage"]["trainable_parameters"]
    assert by["lora-r2"]["trainable_parameters"] > by["frozen"]["trainable_parameters"]
    for r in rows:
        assert r["time_to_train_s"] > 0 and r["peak_rss_mib"] > 0 and 0 <= r["vqa_accuracy"] <= 100
    assert len(by["two-stage"]["run_dirs"]) == 2
    stage2 = json.loads((out / "two-stage" / "stage2" / "checkpoint" / "training_metadata.json").read_text())
    assert stage2["init_from"].endswith("stage1/checkpoint") and stage2["strategies"]["vision"] == "partial"
    with open(out / "comparison.csv") as f:
        assert [row["strategy"] for row in csv.DictReader(f)] == ["frozen", "two-stage", "lora-r2"]
    for png in ("curves.png", "accuracy_vs_time.png", "per_answer_type.png"):
        assert (out / png).stat().st_size > 1000
    assert "| strategy |" in capsys.readouterr().out

    # rerun: what finished is skipped; a strategy interrupted after its last checkpoint resumes from it
    shutil.rmtree(out / "frozen" / "checkpoint")
    main(args)
    printed = capsys.readouterr().out
    assert f"frozen: interrupted earlier, resuming from {out / 'frozen' / 'checkpoints' / 'last.ckpt'}" in printed
    for label in ("two-stage stage 1", "two-stage stage 2", "lora-r2"):
        assert f"{label}: finished earlier" in printed
    meta = json.loads((out / "frozen" / "checkpoint" / "training_metadata.json").read_text())
    assert meta["resumed_from_step"] == meta["steps"] > 0
    again = json.loads((out / "comparison.json").read_text())
    assert again[1:] == rows[1:] and again[0]["trainable_parameters"] == rows[0]["trainable_parameters"]
    assert (out / "frozen" / "train.resumed.log").is_file()
    # other settings in the same out_dir: refused before anything is trained or overwritten
    base = (out / "base.yaml").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--train.lr", "0.01"])
    assert "was trained with other settings (train.lr: 0.001 -> 0.01)" in capsys.readouterr().err
    assert (out / "base.yaml").read_text() == base


def test_strategy_names_are_checked():
    assert parse_strategies("frozen, lora", "4,8") == ["frozen", "lora", "lora-r4", "lora-r8"]
    with pytest.raises(ValueError, match="available strategies"):
        parse_strategies("frozen,adapter")
