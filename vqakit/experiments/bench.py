"""The benchmark suite: datasets x model recipes, trained, evaluated and timed; JSON + a markdown table.

Every entry of the suite (``benchmarks/suite.yaml``) is ``vqakit train --config RECIPE [ARGS...]`` run in
its own process (so its peak RSS is its own), then:

- accuracy: the official VQA accuracy on the evaluation split, per answer type and per question type
  (on ``shapes-rel`` the question type is the question family);
- time to train: the training loop's wall time (``training_metadata.json``);
- predict latency p50 / p95: ``VQAPredictor.predict(image_path, question)``, one distinct image per call,
  decoding and both towers included, after a warm-up;
- throughput: questions per second of ``predict_examples`` over evaluation questions with the feature
  cache off (images decoded, towers run, batch 64);
- peak memory: the training process's peak RSS.

``--quick`` shrinks everything (a few hundred questions, a few steps, a few timed calls) for tests.
The load average is recorded: timings on a shared machine are upper bounds.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vqakit.configs import resolve_config

QUICK_ARGS = ["--data.limit", "120", "--train.epochs", "1", "--train.max_steps", "3", "--data.val_fraction", "0.1"]


def load_suite(path: str | Path) -> list[dict]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark suite {path} not found")
    suite = yaml.safe_load(path.read_text()) or {}
    entries = suite.get("entries") if isinstance(suite, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a key 'entries' with a list of {{name, config, args}}")
    for i, e in enumerate(entries):
        if isinstance(e, dict) and e.get("kind") == "transfer" and "name" in e:
            continue  # datasets x seeds with one recipe (vqakit.experiments.transfer)
        if not isinstance(e, dict) or "name" not in e or "config" not in e:
            raise ValueError(f"{path}: entries[{i}] needs 'name' and 'config' (got {e!r})")
        try:
            resolve_config(str(e["config"]))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: entries[{i}] ({e['name']}): {err}") from err
    return entries


def _latency(predictor, examples, n: int, warmup: int) -> dict:
    seen, pairs = set(), []
    for e in examples:  # one question per image: no image is decoded twice
        if e.image_id not in seen:
            seen.add(e.image_id)
            pairs.append((e.image, e.question))
    pairs = pairs[: warmup + n]
    for image, question in pairs[:warmup]:
        predictor.predict(image, question)
    times = []
    for image, question in pairs[warmup:]:
        start = time.perf_counter()
        predictor.predict(image, question)
        times.append(1000 * (time.perf_counter() - start))
    if not times:
        raise ValueError("no questions left to time; lower the warm-up or use a bigger evaluation split")
    times.sort()
    return {"calls": len(times), "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 2)}


def _throughput(predictor, examples, n: int) -> float:
    subset = examples[:n]
    predictor.predict_examples(subset[: min(8, len(subset))], batch_size=64, use_cache=False, progress=False)  # warm
    start = time.perf_counter()
    predictor.predict_examples(subset, batch_size=64, use_cache=False, progress=False)
    return round(len(subset) / (time.perf_counter() - start), 1)


def run_entry(entry: dict, out_dir: Path, extra_args: list[str], quick: bool, reuse: bool = False) -> dict:
    """Train + evaluate one entry in a subprocess (or, with ``reuse``, take a finished run of it from
    ``out_dir``), then time prediction here."""
    from vqakit.data.config import DataConfig, load_split
    from vqakit.inference.predict import VQAPredictor

    run_dir = out_dir / entry["name"]
    args = [sys.executable, "-m", "vqakit.cli", "train", "--config", entry["config"], *map(str, entry.get("args", [])),
            *(QUICK_ARGS if quick else []), *extra_args, "--train.out_dir", str(run_dir), "--train.progress", "false"]
    ckpt = run_dir / "checkpoint"
    wall = None
    if reuse and (ckpt / "training_metadata.json").is_file() and list(ckpt.glob("eval-*/metrics.json")):
        print(f"reusing the finished run {run_dir}", flush=True)
    else:
        print("$ " + shlex.join(args[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        wall = round(time.perf_counter() - start, 1)
        (out_dir / f"{entry['name']}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark entry {entry['name']!r} failed (exit {proc.returncode}); last lines:\n"
                               + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
    meta = json.loads((ckpt / "training_metadata.json").read_text())
    metrics_files = sorted(ckpt.glob("eval-*/metrics.json"))
    if not metrics_files:
        raise RuntimeError(f"benchmark entry {entry['name']!r}: no evaluation metrics under {ckpt}")
    metrics = json.loads(metrics_files[0].read_text())

    data = _data_config(run_dir, DataConfig)
    examples = load_split(data, data.eval_split)
    predictor = VQAPredictor.from_pretrained(ckpt, backend="torch")
    latency = _latency(predictor, examples, n=5 if quick else 100, warmup=2 if quick else 10)
    throughput = _throughput(predictor, examples, n=16 if quick else 512)
    return {
        "name": entry["name"],
        "recipe": entry["config"],
        "args": [str(a) for a in entry.get("args", [])],
        "dataset": data.dataset,
        "eval_split": data.eval_split,
        "eval_questions": metrics["num_questions"],
        "vqa_accuracy": metrics["vqa_accuracy"],
        "per_answer_type": metrics["per_answer_type"],
        "per_question_type": metrics["per_question_type"] if data.dataset == "shapes-rel" else None,
        "time_to_train_s": meta["time_to_train_s"],
        "epochs": meta["epochs"],
        "train_questions": meta["num_train_questions"],
        "wall_s": wall,
        "reused_run": wall is None,
        "predict_latency": latency,
        "throughput_qps": throughput,
        "peak_rss_mib": meta["peak_rss_mib"],
        "trainable_parameters": meta["parameters"]["trainable"],
    }


def _data_config(run_dir: Path, cls):
    """The DataConfig the run was trained with (from the run's saved config)."""
    import dataclasses

    import yaml

    path = run_dir / "config.yaml"
    if path.is_file():
        data = yaml.safe_load(path.read_text())["data"]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
    raise FileNotFoundError(f"{run_dir}/config.yaml not found: cannot tell which data the run used")


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| dataset | recipe | VQA acc | yes/no | number | other | train s | p50 ms | p95 ms | q/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["per_answer_type"]
        lines.append(
            f"| {r['name']} | {Path(r['recipe']).name} | {r['vqa_accuracy']:.2f} | {t.get('yes/no', '-')} | "
            f"{t.get('number', '-')} | {t.get('other', '-')} | {r['time_to_train_s']:.0f} | "
            f"{r['predict_latency']['p50_ms']} | {r['predict_latency']['p95_ms']} | {r['throughput_qps']} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    for r in rows:
        if r.get("per_question_type"):
            fam = ", ".join(f"{k} {v}" for k, v in sorted(r["per_question_type"].items()))
            lines.append(f"\n{r['name']} per question family: {fam}")
    return "\n".join(lines)


def run_suite(suite: str | Path, out_dir: str | Path, quick: bool = False, extra_args: list[str] | None = None,
              only: list[str] | None = None, reuse: bool = False, results_dir: str | Path | None = None) -> dict:
    entries = load_suite(suite)
    if only:
        unknown = set(only) - {e["name"] for e in entries}
        if unknown:
            raise ValueError(f"--only {sorted(unknown)} not in {suite}; entries = {[e['name'] for e in entries]}")
        entries = [e for e in entries if e["name"] in only]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    transfer = {}
    for e in [e for e in entries if e.get("kind") == "transfer"]:
        from vqakit.experiments.transfer import run_transfer, transfer_markdown

        transfer[e["name"]] = run_transfer(e, out / e["name"], extra_args or [], quick)
        print(transfer_markdown(transfer[e["name"]]), flush=True)
    rows = [run_entry(e, out, extra_args or [], quick, reuse) for e in entries if e.get("kind") != "transfer"]
    result = {
        "benchmark": "vqakit bench",
        "suite": str(suite),
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
    }
    if transfer:
        result["transfer"] = transfer
    stem = "bench" if rows or not transfer else "transfer"  # a transfer-only run keeps bench.json as it is
    for folder in [out] + ([Path(results_dir)] if results_dir else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        md = [markdown_table(rows)] if rows else []
        if transfer:
            from vqakit.experiments.transfer import transfer_markdown

            md += [f"## {name}\n\n{transfer_markdown(t)}" for name, t in transfer.items()]
        (folder / f"{stem}.md").write_text("\n\n".join(md) + "\n")
    return result
