"""DDP across 2 CPU processes (gloo), end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_ddp_two_cpu_processes(tiny_model_args, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "vqakit.cli", "train", *tiny_model_args, "--data.limit", "48",
        "--data.cache_dir", str(tmp_path / "cache"), "--train.out_dir", str(run), "--train.epochs", "2",
        "--train.batch_size", "4", "--train.accelerator", "cpu", "--train.strategy", "ddp",
        "--train.devices", "2", "--train.progress", "false", "--train.text", "full",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    meta = json.loads((run / "checkpoint" / "training_metadata.json").read_text())
    per_rank = -(-meta["num_train_questions"] // 2)  # each rank sees half the questions
    assert meta["steps"] == 2 * -(-per_rank // 4)  # 2 epochs, batch 4
    assert (run / "checkpoint" / "eval-easy-vqa-test" / "metrics.json").is_file()
    assert "VQA accuracy (official)" in done.stdout
    # the validation score per question type, synced across the ranks (a rank without a group's questions
    # still logs it: otherwise the ranks would wait on each other at the epoch's end)
    per_type = {k: v for k, v in meta["validation"].items() if k.startswith("val/vqa_score_per_type/")}
    assert len(per_type) >= 2 and all(0.0 <= v <= 1.0 for v in per_type.values())
