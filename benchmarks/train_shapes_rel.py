"""Train a recipe on the shapes-rel procedural benchmark and report accuracy per question family.

    python benchmarks/train_shapes_rel.py --config shapes-rel --out benchmarks/results/train_shapes_rel.json
    python benchmarks/train_shapes_rel.py --config shapes-rel --seed 1 --out_dir runs/bench-shapes-rel-seed1 \
        --out benchmarks/results/train_shapes_rel_seed1.json          # the same recipe, another seed
    python benchmarks/train_shapes_rel.py --config easy-vqa --dataset_override \
        --out benchmarks/results/train_shapes_rel_baseline.json      # the easy-VQA recipe, as is, on shapes-rel

The family is the annotation's question type, so ``per_question_type`` of the evaluation is the
per-family accuracy. Targets (issue 6): relational >= 95, attribute >= 99, relational within 5 points
of attribute, training <= 20 minutes on 2 CPU cores. The load average is recorded with the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from vqakit.configs import resolve_config


def per_template(eval_dir: Path, data) -> dict:
    """VQA accuracy per question template (``closest_shape``, ``left_of``, ...) from the evaluation's
    predictions.csv and the split's annotations (shapes-rel keeps the template in ``question_template``)."""
    import csv

    from vqakit.data.procedural import SPLITS, ShapesRelConfig, default_root
    from vqakit.data.sources import vqa_v2_paths, vqa_v2_split_name

    root = Path(data.root) if data.root else default_root(ShapesRelConfig(**data.source_options))
    _, annotations_path, _ = vqa_v2_paths(root, vqa_v2_split_name(SPLITS[data.eval_split]))
    template = {a["question_id"]: a.get("question_template", "?")
                for a in json.loads(Path(annotations_path).read_text())["annotations"]}
    scores: dict[str, list[float]] = {}
    with open(eval_dir / "predictions.csv") as f:
        for row in csv.DictReader(f):
            scores.setdefault(template[int(row["question_id"])], []).append(float(row["vqa_accuracy"]))
    return {t: round(100 * sum(v) / len(v), 2) for t, v in sorted(scores.items())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shapes-rel")
    ap.add_argument("--dataset_override", action="store_true",
                    help="run the config's model and training settings on shapes-rel (train / val)")
    ap.add_argument("--out_dir", default="runs/bench-shapes-rel")
    ap.add_argument("--out", default="benchmarks/results/train_shapes_rel.json")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None, help="train.seed (weights init, shuffling, dropout)")
    args = ap.parse_args(argv)

    from vqakit.data.config import DataConfig
    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.train.config import TrainConfig
    from vqakit.train.run import fit, peak_rss_mib

    cfg = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    data_cfg = cfg.get("data", {})
    if args.dataset_override:
        data_cfg = {**data_cfg, "dataset": "shapes-rel", "root": None, "train_split": "train", "eval_split": "val"}
    data = DataConfig(**data_cfg)
    train_cfg = {**cfg.get("train", {}), "out_dir": args.out_dir, "progress": False}
    if args.epochs is not None:
        train_cfg["epochs"] = args.epochs
    if args.seed is not None:
        train_cfg["seed"] = args.seed
    train = TrainConfig(**train_cfg)
    load_before = os.getloadavg()
    start = time.perf_counter()
    summary = fit(TwoTowerConfig(**cfg.get("model", {})), data, train)
    wall = time.perf_counter() - start
    m = summary["metrics"]
    families = m["per_question_type"]
    templates = per_template(Path(summary["checkpoint"]) / f"eval-{data.dataset}-{data.eval_split}", data)
    result = {
        "benchmark": "train_shapes_rel",
        "config": args.config,
        "dataset_override": args.dataset_override,
        "model": cfg.get("model", {}),
        "train": {k: v for k, v in train_cfg.items() if k not in ("out_dir", "progress")},
        "num_train_questions": summary.get("num_train_questions"),
        "val_vqa_accuracy": m["vqa_accuracy"],
        "val_per_family": families,
        "val_per_answer_type": m["per_answer_type"],
        "val_per_template": templates,
        "relational_minus_attribute": round(families.get("relational", 0) - families.get("attribute", 0), 2),
        "time_to_train_s": summary["time_to_train_s"],
        "wall_s_total": round(wall, 1),
        "epochs": summary["epochs"],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": summary["parameters"],
        "cpus": os.cpu_count(),
        "torch_threads": __import__("torch").get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
