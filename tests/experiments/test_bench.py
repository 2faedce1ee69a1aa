"""`vqakit bench --quick` end to end on tiny towers: every column of the table is measured, not copied."""

import json
from pathlib import Path

import pytest

from vqakit.experiments.bench import load_suite, markdown_table
from vqakit.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick(tiny_model_args, tmp_path, capsys):
    from vqakit.data.procedural import write_shapes_rel

    root = write_shapes_rel(tmp_path / "shapes", num_train_images=30, num_val_images=10, questions_per_image=5)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "entries:\n"
        f"  - name: shapes\n    config: {REPO / 'vqakit' / 'configs' / 'easy-vqa.yaml'}\n"
        f"    args: [--data.dataset, shapes-rel, --data.root, {root}, --data.eval_split, val]\n"
    )
    extra = [*tiny_model_args, "--model.vision.multiscale", "false", "--data.cache_dir", str(tmp_path / "cache"),
             "--train.batch_size", "16"]
    main(["bench", "--suite", str(suite), "--out_dir", str(tmp_path / "out"), "--quick", "true",
          "--results_dir", str(tmp_path / "results"), "--extra_args", json.dumps(extra)])
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    (row,) = result["rows"]
    assert row["dataset"] == "shapes-rel" and row["eval_questions"] == 50
    assert set(row["per_answer_type"]) == {"yes/no", "number", "other"}
    assert set(row["per_question_type"]) == {"attribute", "existence", "counting", "comparison", "relational"}
    assert 0 <= row["vqa_accuracy"] <= 100 and row["time_to_train_s"] > 0 and row["peak_rss_mib"] > 50
    lat = row["predict_latency"]
    assert lat["calls"] == 5 and 0 < lat["p50_ms"] <= lat["p95_ms"] and row["throughput_qps"] > 0
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.startswith("| dataset |") and "| shapes |" in md and "per question family" in md
    assert "| shapes |" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()  # --quick numbers never land in the results folder

    log = tmp_path / "out" / "shapes.log"
    mtime = log.stat().st_mtime
    main(["bench", "--suite", str(suite), "--out_dir", str(tmp_path / "out"), "--quick", "true", "--reuse", "true",
          "--extra_args", json.dumps(extra)])
    again = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"][0]
    assert again["reused_run"] and again["vqa_accuracy"] == row["vqa_accuracy"] and log.stat().st_mtime == mtime


def test_suite_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - name: x\n    config: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_suite(bad)
    bad.write_text("runs: []\n")
    with pytest.raises(ValueError, match="entries"):
        load_suite(bad)


def test_repo_suite_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    names = [e["name"] for e in load_suite(REPO / "benchmarks" / "suite.yaml")]
    assert {"easy-vqa", "shapes-rel"} <= set(names)
    assert markdown_table([]).count("\n") == 1
