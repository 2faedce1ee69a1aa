"""The transfer benchmark: one recipe, same code, trained on datasets it was never tuned on.

``vqakit bench --only transfer`` writes each dataset of :data:`vqakit.data.scenes.SUITE` once (official VQA v2
layout), trains ``vqakit train --recipe auto --data.dataset vqa-v2 --data.root DIR`` on it for every seed (each run
in its own process, so its peak RSS is its own), and reports the official accuracy overall and per question family
against two baselines that each miss one modality:

- **question only**: the blind priors of ``vqakit stats`` (most common answer overall, per question type, per exact
  question), fit on the training split;
- **image only**: a linear classifier over 16x16 RGB thumbnails predicting the majority answer, with no question.

A finished run (checkpoint + metrics on disk) is reused, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_OVERALL, TARGET_FAMILY = 95.0, 90.0


def image_only_baseline(train_examples, eval_examples, thumb: int = 16, epochs: int = 30, seed: int = 0) -> dict:
    """Official accuracy of a linear classifier over ``thumb`` x ``thumb`` RGB thumbnails (no question), per
    question type too."""
    import numpy as np
    import torch
    from PIL import Image

    from vqakit.data.answers import majority_answer
    from vqakit.eval.vqa_accuracy import official_accuracy, vqa_accuracy

    def pixels(examples):
        cache: dict[str, np.ndarray] = {}
        for e in examples:
            if e.image not in cache:
                with Image.open(e.image) as im:
                    cache[e.image] = np.asarray(im.convert("RGB").resize((thumb, thumb), Image.BILINEAR),
                                                dtype=np.float32).reshape(-1) / 255.0
        return torch.from_numpy(np.stack([cache[e.image] for e in examples]))

    train = [e for e in train_examples if e.answers]
    labels = sorted({majority_answer(e.answers) for e in train})
    index = {a: i for i, a in enumerate(labels)}
    x, y = pixels(train), torch.tensor([index[majority_answer(e.answers)] for e in train])
    mean, std = x.mean(0), x.std(0) + 1e-3
    x = (x - mean) / std
    # hold out 10% of the training images to pick the epoch (a linear model on pixels overfits quickly)
    held = torch.tensor([hash(e.image_id) % 10 == 0 for e in train])
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], len(labels))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    best, best_state = -1.0, None
    for _ in range(epochs):
        for batch in torch.nonzero(~held).squeeze(1)[torch.randperm(int((~held).sum()))].split(256):
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (head(x[held]).argmax(-1) == y[held]).float().mean().item() if held.any() else 0.0
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    scored = [e for e in eval_examples if e.answers]
    with torch.no_grad():
        pred = head((pixels(scored) - mean) / std).argmax(-1).tolist()
    accs, per_type = [], {}
    for e, p in zip(scored, pred):
        a = vqa_accuracy(labels[p], e.answers)
        accs.append(a)
        per_type.setdefault(e.question_type, []).append(a)
    return {"vqa_accuracy": official_accuracy(accs),
            "per_question_type": {t: official_accuracy(v) for t, v in sorted(per_type.items())}}


def baselines(root: Path) -> dict:
    """Question-only and image-only baselines of a dataset in the VQA v2 layout (train -> val)."""
    from vqakit.data.sources import load_vqa_v2
    from vqakit.data.stats import baseline_accuracies

    train = load_vqa_v2(root, "train2014").examples
    val = load_vqa_v2(root, "val2014").examples
    blind = baseline_accuracies(train, val)
    out = {name: {"vqa_accuracy": v["vqa_accuracy"], "per_question_type": v["per_question_type"]}
           for name, v in blind.items() if isinstance(v, dict)}
    out["image_only"] = image_only_baseline(train, val)
    return out


def _run(cmd: list[str], log: Path) -> float:
    print("$ " + shlex.join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(cmd[1:])} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return round(time.perf_counter() - start, 1)


def run_transfer(entry: dict, out_dir: Path, extra_args: list[str], quick: bool = False) -> dict:
    """Every (dataset, seed) of a ``kind: transfer`` suite entry; returns the rows and a summary per dataset."""
    from vqakit.data.scenes import SUITE, ensure_suite_dataset, write_scenes

    names = entry.get("datasets") or sorted(SUITE)
    seeds = entry.get("seeds") or [0]
    data_dir = Path(entry.get("data_dir") or out_dir / "datasets")
    rows, summary = [], {}
    for name in names:
        if quick:  # a smoke test: a sliver of each dataset, a few steps
            root = data_dir / f"{name}-quick"
            if not (root / "scenes.json").is_file():
                write_scenes(root, SUITE[name].scaled(num_train_images=40, num_val_images=10, questions_per_image=4))
        else:
            root = ensure_suite_dataset(name, data_dir)
        base_path = out_dir / name / "baselines.json"
        if not base_path.is_file():
            base_path.parent.mkdir(parents=True, exist_ok=True)
            base_path.write_text(json.dumps(baselines(root), indent=1) + "\n")
        base = json.loads(base_path.read_text())
        for seed in seeds:
            run_dir = out_dir / name / f"seed{seed}"
            ckpt = run_dir / "checkpoint"
            metrics_files = sorted(ckpt.glob("eval-*/metrics.json"))
            wall = None
            if not metrics_files:
                cmd = [sys.executable, "-m", "vqakit.cli", "train", "--recipe", entry.get("recipe", "auto"),
                       "--data.dataset", "vqa-v2", "--data.root", str(root), "--data.eval_split", "val",
                       "--train.seed", str(seed), "--data.seed", str(seed), "--train.out_dir", str(run_dir),
                       "--train.progress", "false", *map(str, entry.get("args", [])),
                       *(["--train.max_steps", "3", "--data.val_fraction", "0.2"] if quick else []), *extra_args]
                run_dir.mkdir(parents=True, exist_ok=True)
                wall = _run(cmd, run_dir.parent / f"seed{seed}.log")
                metrics_files = sorted(ckpt.glob("eval-*/metrics.json"))
            metrics = json.loads(metrics_files[0].read_text())
            meta = json.loads((ckpt / "training_metadata.json").read_text())
            fams = metrics["per_question_type"]
            rows.append({
                "dataset": name, "seed": seed, "vqa_accuracy": metrics["vqa_accuracy"], "per_family": fams,
                "worst_family": min(fams, key=fams.get), "eval_questions": metrics["num_questions"],
                "train_questions": meta["num_train_questions"], "steps": meta["steps"],
                "time_to_train_s": meta["time_to_train_s"], "peak_rss_mib": meta["peak_rss_mib"],
                "wall_s": wall, "reused_run": wall is None,
                "meets_target": metrics["vqa_accuracy"] >= TARGET_OVERALL and min(fams.values()) >= TARGET_FAMILY,
            })  # fmt: skip
        mine = [r for r in rows if r["dataset"] == name]
        summary[name] = {
            "seeds": len(mine),
            "vqa_accuracy_mean": round(statistics.fmean(r["vqa_accuracy"] for r in mine), 2),
            "vqa_accuracy_min": min(r["vqa_accuracy"] for r in mine),
            "worst_family_min": min(min(r["per_family"].values()) for r in mine),
            "time_to_train_s_max": max(r["time_to_train_s"] for r in mine),
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in mine),
            "all_meet_target": all(r["meets_target"] for r in mine),
            "baselines": {k: v["vqa_accuracy"] for k, v in base.items()},
            "baselines_per_family": {k: v["per_question_type"] for k, v in base.items()},
        }
    return {"rows": rows, "summary": summary, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def transfer_markdown(result: dict) -> str:
    rows, summary = result["rows"], result["summary"]
    families = sorted({f for r in rows for f in r["per_family"]})
    lines = ["| dataset | seed | VQA acc | " + " | ".join(families) + " | train s | steps | peak RSS MiB |",
             "|---|---|---|" + "---|" * len(families) + "---|---|---|"]
    for r in rows:
        fam = " | ".join(f"{r['per_family'].get(f, '-')}" for f in families)
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['vqa_accuracy']:.2f} | {fam} | {r['time_to_train_s']:.0f} "
                     f"| {r['steps']} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "| dataset | auto (mean of seeds) | question only (per question) | question only (per family) | "
              "image only | most common answer |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        b = s["baselines"]
        lines.append(f"| {name} | {s['vqa_accuracy_mean']:.2f} | {b.get('question_prior', '-')} | "
                     f"{b.get('question_type_prior', '-')} | {b.get('image_only', '-')} | "
                     f"{b.get('most_common_answer', '-')} |")
    return "\n".join(lines)
