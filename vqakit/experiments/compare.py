"""Compare training strategies on the same model, data split and seed: time to train, parameters, memory,
throughput and quality, as tables and plots.

Each strategy trains in its own process (``vqakit train``), so its peak RSS is its own. Strategies:

- ``frozen``: both towers frozen, features from the cache; only fusion + head train.
- ``lora``: LoRA adapters on both towers (PEFT), fusion + head fully trained.
- ``full``: every weight trains.
- ``two-stage``: ``frozen`` for ``stage1_epochs``, then the last ``unfreeze_last_n`` layers of each
  tower unfrozen (``partial``), continuing from stage 1's weights; its time to train is both stages'.
- ``lora-r<R>``: LoRA with rank R (``--lora_ranks 2,4,8,16`` adds one per rank).

A rerun in the same ``out_dir`` skips strategies (two-stage: stages) that finished (checkpoint and
evaluation on disk), resumes an interrupted one from its ``checkpoints/last.ckpt``, and says which; it
refuses to mix results when the settings changed (each strategy records them in ``compare_settings.json``).

Writes ``comparison.{csv,json,md}``, ``curves.png`` (training loss and validation VQA score per
strategy), ``accuracy_vs_time.png`` and ``per_answer_type.png`` into ``out_dir``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

STRATEGY_FLAGS = {
    "frozen": ["--train.vision", "frozen", "--train.text", "frozen"],
    "lora": ["--train.vision", "lora", "--train.text", "lora"],
    "full": ["--train.vision", "full", "--train.text", "full"],
}
COLUMNS = (
    "strategy", "time_to_train_s", "seconds_per_epoch", "trainable_parameters", "total_parameters",
    "trainable_percent", "peak_rss_mib", "examples_per_s", "vqa_accuracy", "accuracy", "precision_macro",
    "recall_macro", "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted", "per_answer_type",
)  # fmt: skip


def parse_strategies(strategies: str, lora_ranks: str | None = None) -> list[str]:
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    names += [f"lora-r{int(r)}" for r in (lora_ranks or "").split(",") if r.strip()]
    valid = (*STRATEGY_FLAGS, "two-stage")
    for name in names:
        if name not in valid and not name.startswith("lora-r"):
            raise ValueError(f"strategy {name!r} not found; available strategies = {list(valid)} and lora-r<rank>")
    if not names:
        raise ValueError("--strategies is empty")
    return list(dict.fromkeys(names))


SETTINGS_FILE = "compare_settings.json"
# settings that do not change what a strategy learns or measures
IGNORED_SETTINGS = {"train": ("progress", "out_dir", "resume", "eval_batch_size"), "data": ("cache_dir", "num_workers")}


def strategy_settings(name: str, config: dict, stage1_epochs: int) -> dict:
    """What a strategy's results depend on: the shared configuration and, for two-stage, the split in stages."""
    settings = {"strategy": name}
    for part in ("model", "data", "train"):
        settings[part] = {k: v for k, v in config[part].items() if k not in IGNORED_SETTINGS.get(part, ())}
    if name == "two-stage":
        settings["stage1_epochs"] = stage1_epochs
    return json.loads(json.dumps(settings))  # as it reads back from JSON


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_settings(out: Path, names: list[str], config: dict, stage1_epochs: int) -> None:
    """Raise before anything trains if a strategy already in ``out`` was trained with other settings."""
    for name in names:
        path = out / name / SETTINGS_FILE
        if path.is_file():
            diff = _differences(json.loads(path.read_text()), strategy_settings(name, config, stage1_epochs))
            if diff:
                raise ValueError(f"{out / name} was trained with other settings ({'; '.join(diff[:5])}): use another "
                                 f"--out_dir, or delete {out / name} to train it again")


def stage_status(run: Path, evaluate: bool = True) -> str:
    """``finished`` (checkpoint and, if wanted, evaluation on disk), ``interrupted`` (a last.ckpt) or ``new``."""
    ckpt = run / "checkpoint"
    if (ckpt / "training_metadata.json").is_file() and (not evaluate or any(ckpt.glob("eval-*/metrics.json"))):
        return "finished"
    return "interrupted" if (run / "checkpoints" / "last.ckpt").is_file() else "new"


def _train_stage(args: list[str], run: Path, log: Path, label: str, evaluate: bool = True) -> None:
    status = stage_status(run, evaluate)
    if status == "finished":
        print(f"{label}: finished earlier ({run / 'checkpoint'}), skipped", flush=True)
        return
    if status == "interrupted":
        print(f"{label}: interrupted earlier, resuming from {run / 'checkpoints' / 'last.ckpt'}", flush=True)
        log = log.with_name(f"{log.stem}.resumed{log.suffix}")  # keep the first attempt's log
    _train(args, log)


def _train(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "vqakit.cli", "train", *args]
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"training failed ({' '.join(cmd)}); last lines of {log}:\n{tail}")


def run_strategy(name: str, base_args: list[str], out: Path, stage1_epochs: int, unfreeze_last_n: int,
                 epochs: int, settings: dict | None = None) -> dict:
    """Train one strategy (skipping what finished earlier, resuming what was interrupted); returns its row."""
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        (run / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    common = [*base_args, "--train.progress", "false", "--train.resume", "true"]
    if name == "two-stage":
        if not 0 < stage1_epochs < epochs:
            raise ValueError(f"two-stage needs 0 < --stage1_epochs ({stage1_epochs}) < --train.epochs ({epochs})")
        _train_stage([*common, *STRATEGY_FLAGS["frozen"], "--train.epochs", str(stage1_epochs),
                      "--train.out_dir", str(run / "stage1"), "--evaluate", "false"],
                     run / "stage1", run / "stage1.log", f"{name} stage 1", evaluate=False)
        _train_stage([*common, "--train.vision", "partial", "--train.text", "partial",
                "--train.unfreeze_last_n", str(unfreeze_last_n), "--train.epochs", str(epochs - stage1_epochs),
                      "--train.init_from", str(run / "stage1" / "checkpoint"), "--train.out_dir", str(run / "stage2")],
                     run / "stage2", run / "stage2.log", f"{name} stage 2")
        stages = [run / "stage1", run / "stage2"]
    else:
        flags = STRATEGY_FLAGS.get(name) or ["--train.vision", "lora", "--train.text", "lora",
                                             "--train.lora_vision.rank", name[len("lora-r"):],
                                             "--train.lora_text.rank", name[len("lora-r"):]]
        _train_stage([*common, *flags, "--train.epochs", str(epochs), "--train.out_dir", str(run)], run,
                     run / "train.log", name)
        stages = [run]
    return _row(name, stages)


def _row(name: str, stages: list[Path]) -> dict:
    metas = [json.loads((s / "checkpoint" / "training_metadata.json").read_text()) for s in stages]
    final = stages[-1] / "checkpoint"
    metrics = json.loads(next(final.glob("eval-*/metrics.json")).read_text())
    epoch_seconds = [t for m in metas for t in m["epoch_seconds"]]
    time_to_train = sum(m["time_to_train_s"] for m in metas)
    steps_examples = sum(m["examples_per_s"] * m["time_to_train_s"] for m in metas)
    params = metas[-1]["parameters"]  # the final stage's (two-stage: what stage 2 trains)
    return {
        "strategy": name,
        "time_to_train_s": round(time_to_train, 1),
        "seconds_per_epoch": round(sum(epoch_seconds) / max(1, len(epoch_seconds)), 1),
        "trainable_parameters": params["trainable"],
        "total_parameters": params["total"],
        "trainable_percent": round(100 * params["trainable"] / params["total"], 2),
        "peak_rss_mib": max(m["peak_rss_mib"] for m in metas),
        "examples_per_s": round(steps_examples / max(time_to_train, 1e-9), 1),
        "vqa_accuracy": metrics["vqa_accuracy"],
        "accuracy": metrics["exact_match"],
        **{k: metrics[k] for k in ("precision_macro", "recall_macro", "f1_macro", "precision_weighted",
                                   "recall_weighted", "f1_weighted")},
        "per_answer_type": metrics["per_answer_type"],
        "run_dirs": [str(s) for s in stages],
    }


def write_outputs(rows: list[dict], out: Path) -> None:
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([json.dumps(r[c]) if isinstance(r[c], dict) else r[c] for c in COLUMNS])
    (out / "comparison.md").write_text(markdown_table(rows))
    plot(rows, out)


def markdown_table(rows: list[dict]) -> str:
    head = ("| strategy | time to train (s) | s/epoch | trainable params | % | peak RSS (MiB) | ex/s | VQA acc "
            "| accuracy | P (macro) | R (macro) | F1 (macro) | F1 (weighted) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['time_to_train_s']} | {r['seconds_per_epoch']} | {r['trainable_parameters']:,} "
            f"| {r['trainable_percent']} | {r['peak_rss_mib']} | {r['examples_per_s']} | {r['vqa_accuracy']} "
            f"| {r['accuracy']} | {r['precision_macro']} | {r['recall_macro']} | {r['f1_macro']} | {r['f1_weighted']} |"
        )
    return "\n".join(lines) + "\n"


def _curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    path = run_dir / "logs" / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/vqa_score": []}
    if not path.is_file():
        return curves
    with open(path) as f:
        for row in csv.DictReader(f):
            for key in curves:
                if row.get(key):
                    curves[key].append((int(row["step"]), float(row[key])))
    return curves


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        offset = 0
        for i, run_dir in enumerate(map(Path, r["run_dirs"])):
            c = _curves(run_dir)
            for ax, key in zip(axes, ("train/loss", "val/vqa_score")):
                if c[key]:
                    xs, ys = zip(*c[key])
                    ax.plot([x + offset for x in xs], ys, label=r["strategy"] if i == 0 else None,
                            color=f"C{rows.index(r)}")
            offset += max([s for s, _ in c["train/loss"]] or [0])
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].set(title="validation VQA score", xlabel="step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # a run too short to validate has no curve to label
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):
        ax.scatter(r["time_to_train_s"], r["vqa_accuracy"], color=f"C{i}", label=r["strategy"])
    ax.set(title="accuracy vs time to train", xlabel="time to train (s)", ylabel="test VQA accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)
    plt.close(fig)

    types = sorted({t for r in rows for t in r["per_answer_type"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(types))], [r["per_answer_type"].get(t, 0) for t in types],
               width, label=r["strategy"], color=f"C{i}")
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(types))], types)
    ax.set(title="VQA accuracy per answer type", ylabel="VQA accuracy")
    ax.legend(loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(out / "per_answer_type.png", dpi=120)
    plt.close(fig)
