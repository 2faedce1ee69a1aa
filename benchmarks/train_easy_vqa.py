"""The `make demo` recipe, measured: accuracy, time to train, wall time from a cold cache, peak memory.

    python benchmarks/train_easy_vqa.py [--config easy-vqa] [--cold]

``--cold`` uses an empty feature cache (what a fresh machine pays: the towers encode every image and
question once). Writes JSON to ``--out``. Targets (issue 2): easy-VQA test official accuracy >= 99.8,
the whole recipe <= 10 minutes on 2 CPU cores, peak RSS < 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from vqakit.configs import resolve_config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="easy-vqa")
    ap.add_argument("--out_dir", default="runs/bench-easy-vqa")
    ap.add_argument("--cold", action="store_true", help="start from an empty feature cache")
    ap.add_argument("--out", default="benchmarks/results/train_easy_vqa.json")
    args = ap.parse_args(argv)

    from vqakit.data.config import DataConfig
    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.train.config import TrainConfig
    from vqakit.train.run import fit, peak_rss_mib

    cfg = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    data = DataConfig(**cfg.get("data", {}))
    if args.cold:
        data.cache_dir = tempfile.mkdtemp(prefix="vqakit-cold-cache-")
    train = TrainConfig(**{**cfg.get("train", {}), "out_dir": args.out_dir, "progress": False})
    start = time.perf_counter()
    summary = fit(TwoTowerConfig(**cfg.get("model", {})), data, train)
    wall = time.perf_counter() - start
    m = summary["metrics"]
    result = {
        "benchmark": "train_easy_vqa",
        "config": args.config,
        "cold_cache": args.cold,
        "test_vqa_accuracy": m["vqa_accuracy"],
        "test_per_answer_type": m["per_answer_type"],
        "test_f1_macro": m["f1_macro"],
        "time_to_train_s": summary["time_to_train_s"],
        "wall_s_total": round(wall, 1),
        "epochs": summary["epochs"],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": summary["parameters"],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
