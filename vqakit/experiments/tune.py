"""``vqakit tune``: a budgeted hyperparameter search around a base recipe, with Optuna.

The base is any nested config ``{"model": ..., "data": ..., "train": ...}`` (a preset, with dotted overrides).
The search varies its main knobs (learning rate, width, fusion depth / reasoning steps, dropout, weight decay,
batch size, training length), each only where the base has it, and selects on the validation VQA accuracy of
a split held out of the training data (``data.val_fraction``, seeded by ``data.seed``): the evaluation split is
never read.

- Sampler: TPE (Bergstra et al., 2011, "Algorithms for Hyper-Parameter Optimization",
  https://papers.nips.cc/paper/4443-algorithms-for-hyper-parameter-optimization), after a few random trials.
  Trial 0 is the base config itself, so the best trial is never worse than the base on validation.
- Pruner: the median stopping rule (Golovin et al., 2017, "Google Vizier", https://research.google/pubs/pub46180/)
  on the validation accuracy reported ``reports_per_trial`` times per trial, at the same fractions of each
  trial's own schedule (a short and a long run are compared at the same point of their warm-up + cosine decay).
- Storage: SQLite (Akiba et al., 2019, "Optuna", https://arxiv.org/abs/1907.10902), so a killed search resumes:
  finished trials stay, a trial whose process died is marked failed and retried once (at once when it ran on
  this machine, else through Optuna's heartbeat after ``HEARTBEAT_GRACE_S``).
- Budget: ``budget_minutes`` of wall time summed over the sessions of a study; a trial is started only when the
  mean duration of the last three completed trials still fits in what is left. ``trials`` caps the number of
  completed + pruned trials.

Trials run in this process through ``vqakit.train.run.fit`` with a Lightning callback (``TrialReporter``) that
reports each validation to Optuna and raises ``optuna.TrialPruned`` when the pruner says so. Frozen towers'
features come from the shared feature cache, so every trial after the first skips encoding.

Outputs in ``out_dir``: ``best_config.yaml`` (a preset: ``vqakit train --config best_config.yaml``),
``trials.csv``, ``trials.md``, ``tune.png``, ``space.yaml`` (the space, in the ``--space`` format),
``study.db`` and ``trials/trial-NNN/`` (each trial's run; only the best keeps its weights).

Example (a 2-trial search of a tiny base; see docs/tuning.md for real ones):

    >>> from vqakit.experiments.tune import Knob
    >>> Knob("train.lr", low=1e-4, high=1e-2, log=True).describe()
    'log-uniform in [0.0001, 0.01]'
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import yaml

MONITOR = "val/vqa_score"  # logged by VQASystem.validation_step: mean soft VQA score of the top answer
STEPS_MULTIPLIER = "steps_multiplier"  # the one knob that is not a config key: training length vs the base plan
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
TRIAL_ONLY_KEYS = ("train.out_dir", "train.resume", "train.progress", "train.val_every_n_steps")
CO_ATTENTION_FUSIONS = ("cross-attention", "spatial", "relational")
PRUNERS = ("median", "none")

logger = logging.getLogger("vqakit")


# ---------------------------------------------------------------------------------------------------------------
# the search space


@dataclass
class Knob:
    """One searched setting and its range.

    Args:
        name: a dotted key of the config (``train.lr``, ``model.hidden_size``) or ``steps_multiplier`` (training
            length: this multiple of the base plan's training questions, i.e. of its steps at the base batch size).
        low: lower end of a numeric range.
        high: upper end of a numeric range.
        log: sample uniformly in log space (``low`` must be > 0).
        step: sample on the grid ``low, low + step, ...`` (not with ``log``).
        choices: the values of a categorical knob (instead of ``low`` / ``high``).
        why: how the range was chosen (printed with the space).
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    why: str = ""

    def __post_init__(self):
        where = f"search space knob {self.name!r}"
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError(f"{where}: give either choices or low/high (with log/step), not both")
            if not isinstance(self.choices, list) or not self.choices:
                raise ValueError(f"{where}: choices={self.choices!r} must be a non-empty list")
            bad = [c for c in self.choices if not isinstance(c, (bool, int, float, str)) and c is not None]
            if bad:
                raise ValueError(f"{where}: choices must be numbers, strings, booleans or null, not {bad}")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"{where}: give low and high (a numeric range) or choices (a list)")
        self.low, self.high = _number(self.low, where, "low"), _number(self.high, where, "high")
        if self.step is not None:
            self.step = _number(self.step, where, "step")
            if self.step <= 0:
                raise ValueError(f"{where}: step={self.step} must be > 0")
        if self.low > self.high:
            raise ValueError(f"{where}: low={self.low} is above high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: log=true needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError(f"{where}: log and step cannot be combined (Optuna samples one or the other)")

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "categorical"
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))
        return "int" if ints and (self.step is None or isinstance(self.step, int)) else "float"

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.kind == "int" and value != int(value):
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {self.choices}"
        spread = "log-uniform" if self.log else "uniform"
        if self.kind == "int":
            spread = "integer" + (" (log)" if self.log else "")
        grid = f" step {self.step:g}" if self.step is not None else ""
        return f"{spread} in [{self.low:g}, {self.high:g}]{grid}"

    def to_spec(self) -> dict:
        """The ``--space`` YAML entry of this knob."""
        return {k: v for k, v in asdict(self).items() if k != "name" and not (v is None or v is False or v == "")}


def _number(value, where: str, key: str) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: {key}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key}={value!r} is not a number")
    return value


def get_dotted(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_dotted(cfg: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def _has(cfg: dict, key: str) -> bool:
    try:
        get_dotted(cfg, key)
        return True
    except KeyError:
        return False


def _config_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        keys += _config_keys(v, name + ".") if isinstance(v, dict) and v and k != "source_options" else [name]
    return keys


def default_space(base: dict) -> list[Knob]:
    """The main knobs of ``base``, each only where the base config has it, with ranges around its values."""
    model, train = base.get("model", {}), base.get("train", {})
    knobs = []
    lr = train.get("lr")
    if isinstance(lr, (int, float)) and lr > 0:
        knobs.append(Knob("train.lr", low=lr / 4, high=lr * 4, log=True, why=f"within 4x of the base {lr:g}"))
    trained = {train.get("vision"), train.get("text")}
    for key, strategies in (("tower_lr", {"full", "partial"}), ("lora_lr", {"lora", "qlora"})):
        value = train.get(key)
        if trained & strategies and isinstance(value, (int, float)) and value > 0:
            knobs.append(Knob(f"train.{key}", low=value / 4, high=value * 4, log=True,
                              why=f"a tower trains ({'/'.join(sorted(trained & strategies))}); within 4x of {value:g}"))
    if isinstance(model.get("hidden_size"), int):
        h, heads = model["hidden_size"], model.get("num_heads", 1) or 1
        choices = sorted({c for c in (h // 2, h, 2 * h) if c >= heads and c % heads == 0})
        if len(choices) > 1:
            knobs.append(Knob("model.hidden_size", choices=choices,
                              why=f"half, base and double width (divisible by num_heads={heads})"))
    fusion = model.get("fusion")
    if isinstance(model.get("num_fusion_layers"), int) and fusion in CO_ATTENTION_FUSIONS:
        n = model["num_fusion_layers"]
        fewest = 0 if fusion == "relational" else 1  # the relational steps can read the cells with no layer
        knobs.append(Knob("model.num_fusion_layers", low=max(fewest, n - 1), high=n + 1,
                          why=f"base {n} +- 1 ({fusion} fusion)"))
    if isinstance(model.get("reasoning_steps"), int) and fusion == "relational":
        s, free = model["reasoning_steps"], int(model.get("free_steps") or 0)
        knobs.append(Knob("model.reasoning_steps", low=max(1 + free, s - 2), high=s + 2,
                          why=f"base {s} +- 2" + (f", more than its {free} free" if free else "")))
    dropout = model.get("dropout")
    if isinstance(dropout, (int, float)):
        high = round(min(0.5, max(0.3, 2 * dropout)), 3)
        knobs.append(Knob("model.dropout", low=0.0, high=high, why=f"from none to {high:g} (base {dropout:g})"))
    wd = train.get("weight_decay")
    if isinstance(wd, (int, float)):
        low, high = (wd / 10, min(0.3, wd * 10)) if wd > 0 else (1e-5, 0.1)
        knobs.append(Knob("train.weight_decay", low=low, high=high, log=True,
                          why=f"within 10x of the base {wd:g}" if wd > 0 else "base 0: a log range of small decays"))
    b = train.get("batch_size")
    if isinstance(b, int):
        choices = sorted({c for c in (b // 2, b, 2 * b) if c >= 1})
        knobs.append(Knob("train.batch_size", choices=choices, why=f"half, base and double (base {b})"))
    if "max_steps" in train and "epochs" in train:
        knobs.append(Knob(STEPS_MULTIPLIER, low=0.5, high=2.0, step=0.25,
                          why="0.5x to 2x the base plan's training questions"))
    return knobs


def load_space(path: str | Path, base: dict) -> list[Knob]:
    """Read a ``--space`` YAML file: ``{knob: {low, high[, log][, step]} | {choices: [...]}}``.

    Example::

        train.lr: {low: 3.0e-4, high: 3.0e-3, log: true}
        model.hidden_size: {choices: [64, 128, 256]}
        model.reasoning_steps: {low: 2, high: 6}
        steps_multiplier: {low: 0.5, high: 2.0, step: 0.25}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--space={path}: no such file")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"--space={path}: expected a mapping of knobs to ranges, e.g. "
                         "'train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}'")
    from vqakit.models.registry import upgrade_dotted_key

    known = {f.name for f in fields(Knob)} - {"name"}
    knobs = []
    for name, entry in spec.items():
        name = upgrade_dotted_key(name)  # model.image_size (the flat layout) -> model.vision.image_size
        if name != STEPS_MULTIPLIER and not _has(base, name):
            raise ValueError(f"--space={path}: {name!r} is not a key of the base config; valid keys = "
                             f"{[STEPS_MULTIPLIER, *_config_keys(base)]}")
        if name in TRIAL_ONLY_KEYS or name in ("train.max_steps", "train.epochs"):
            raise ValueError(f"--space={path}: {name!r} is set by tune itself; search the training length with "
                             f"{STEPS_MULTIPLIER!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"--space={path}: {name}: expected {{low, high}} or {{choices}}, got {entry!r}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"--space={path}: {name} has {unknown}; known = {sorted(known)}")
        try:
            knobs.append(Knob(name=name, **entry))
        except ValueError as err:
            raise ValueError(f"--space={path}: {err}") from None
    return knobs


def format_space(knobs: list[Knob]) -> str:
    width = max(len(k.name) for k in knobs)
    return "\n".join(f"  {k.name:<{width}}  {k.describe():<40} {k.why}" for k in knobs)


def write_space(knobs: list[Knob], path: Path) -> None:
    header = "# The search space of this study, in the `vqakit tune --space` format.\n"
    path.write_text(header + yaml.safe_dump({k.name: k.to_spec() for k in knobs}, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# trials: configs and the Lightning reporter


def parse_config(cfg: dict):
    """``(TwoTowerConfig, DataConfig, TrainConfig)`` from a nested config, parsed as ``vqakit train --config``
    parses a preset (unknown keys and bad values are errors naming them)."""
    from jsonargparse import ArgumentParser

    from vqakit.data.config import DataConfig
    from vqakit.models.registry import upgrade_recipe
    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.train.config import TrainConfig

    cfg = upgrade_recipe(cfg)[0]  # a config of the flat tower layout (model.vision_grid_stride) too
    unknown = sorted(set(cfg) - {"model", "data", "train"})
    if unknown:
        raise ValueError(f"tune searches the two-tower classifier: the config's sections must be model, data and "
                         f"train, not {unknown}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TwoTowerConfig, "model")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_class_arguments(TrainConfig, "train")
    try:
        parsed = parser.parse_object(cfg)
    except Exception as err:  # jsonargparse's ArgumentError: the message names the key
        raise ValueError(f"bad config: {err}") from None
    init = parser.instantiate(parsed) if hasattr(parser, "instantiate") else parser.instantiate_classes(parsed)
    return init.model, init.data, init.train


def count_questions(data) -> tuple[int, int]:
    """Training and validation questions of ``data``'s training split after the seeded hold-out."""
    from vqakit.data.config import load_split, split_validation

    examples = load_split(data, data.train_split)
    train, val = split_validation(examples, data.val_fraction, data.seed)
    return len(train), len(val)


def base_steps(train: dict, num_train: int) -> int:
    """Optimizer steps of the base plan: ``max_steps`` when set, else ``epochs`` passes."""
    per_epoch = -(-num_train // train["batch_size"])
    return train["max_steps"] if train["max_steps"] > 0 else train["epochs"] * per_epoch


def trial_config(base: dict, params: dict, num_train: int, reports: int) -> dict:
    """The full config of a trial: ``base`` with ``params`` applied and its training length set.

    The length is ``steps_multiplier`` times the base plan's training questions (so a larger batch takes fewer
    steps), rounded up to a multiple of ``reports`` so that validation falls exactly on the reporting steps and
    the last one; ``epochs`` is raised to cover it (``max_steps`` ends the run).
    """
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        if key != STEPS_MULTIPLIER:
            set_dotted(cfg, key, value)
    train = cfg["train"]
    examples = params.get(STEPS_MULTIPLIER, 1.0) * base_steps(base["train"], num_train) * base["train"]["batch_size"]
    steps = max(1, math.ceil(examples / train["batch_size"]))
    steps = reports * -(-steps // reports)
    train["max_steps"] = steps
    train["epochs"] = -(-steps // -(-num_train // train["batch_size"]))
    train["val_every_n_steps"] = steps // reports
    return cfg


class TrialReporter(L.Callback):
    """Reports the validation VQA accuracy (%) of a run to an Optuna trial; raises ``optuna.TrialPruned``
    when the trial's pruner stops it.

    The report step is the index of the validation within the trial's own schedule (1 .. ``reports``), so
    trials of different lengths and batch sizes are compared at the same fraction of their training. The last
    validation (the final weights) is never pruned: it is the trial's result.
    """

    def __init__(self, trial, total_steps: int, reports: int, on_report=None):
        self.trial, self.total_steps, self.reports = trial, total_steps, reports
        self.on_report = on_report
        self.history: list[tuple[int, float]] = []  # (global step, val VQA accuracy %)
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or MONITOR not in trainer.callback_metrics:
            return
        import optuna

        value = 100 * float(trainer.callback_metrics[MONITOR])
        step = trainer.global_step
        index = max(1, round(self.reports * step / self.total_steps))
        if self.history and step <= self.history[-1][0]:
            return  # validated twice at one step: reported once
        self.history.append((step, value))
        self.trial.report(value, index)
        if self.on_report is not None:
            self.on_report()
        if step < self.total_steps and self.trial.should_prune():
            self.pruned_at = step
            raise optuna.TrialPruned(f"val VQA accuracy {value:.2f} at step {step} of {self.total_steps} "
                                     f"(report {index} of {self.reports}) is below the pruner's bar")

    @property
    def final(self) -> float:
        if not self.history or self.history[-1][0] != self.total_steps:
            raise RuntimeError(f"the trial did not validate its final weights (step {self.total_steps}); "
                               f"validations at steps {[s for s, _ in self.history]}")
        return self.history[-1][1]


# ---------------------------------------------------------------------------------------------------------------
# a killed search: trials whose process died


def _start_ticks(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def _worker_alive(worker: str) -> bool:
    """Whether the process that ran a trial still runs; ``True`` when that cannot be told (another machine)."""
    host, pid, ticks = (worker.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    pid = int(pid)
    if pid == os.getpid():  # this process runs one trial at a time: a RUNNING one of ours was interrupted
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not ticks or _start_ticks(pid) in (None, ticks)


def recover_dead_trials(study, storage, out: Path, retry) -> list[int]:
    """Mark RUNNING trials whose process died as failed, retry them (``retry``: Optuna's
    ``RetryHeartbeatStaleTrialCallback``) and delete their partial run directories. Returns their numbers."""
    from optuna.trial import TrialState

    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None or _worker_alive(worker):
            continue
        storage.set_trial_user_attr(t._trial_id, "error", f"its process ({worker}) died while it ran")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        retry(study, storage.get_trial(t._trial_id))
        shutil.rmtree(out / "trials" / f"trial-{t.number:03d}", ignore_errors=True)
        dead.append(t.number)
    return dead


# ---------------------------------------------------------------------------------------------------------------
# outputs


def _rows(study) -> list[dict]:
    from optuna.trial import TrialState

    rows, best = [], -math.inf
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == TrialState.COMPLETE else None
        if value is not None:
            best = max(best, value)
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        note = []
        if t.user_attrs.get("base"):
            note.append("base config")
        if "failed_trial" in t.system_attrs:
            note.append(f"retry of trial {t.system_attrs['failed_trial']}")
        if t.state == TrialState.PRUNED and t.user_attrs.get("pruned_at_step") is not None:
            note.append(f"pruned at step {t.user_attrs['pruned_at_step']}")
        if t.state == TrialState.FAIL:
            note.append(str(t.user_attrs.get("error", "failed")).splitlines()[0][:120])
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "val_vqa_accuracy": value,
            "last_reported": last, "best_so_far": best if best > -math.inf else None,
            "steps": t.user_attrs.get("steps"), "seconds": None if duration is None else round(duration, 1),
            **{f"param:{k}": v for k, v in t.params.items()}, "note": "; ".join(note),
        })
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_tables(rows: list[dict], knobs: list[Knob], out: Path, header: list[str]) -> None:
    columns = ["trial", "state", "val_vqa_accuracy", "last_reported", "best_so_far", "steps", "seconds",
               *[f"param:{k.name}" for k in knobs], "note"]
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    titles = ["trial", "state", "val VQA acc", "last report", "steps", "s", *[k.name for k in knobs], "note"]
    keys = ["trial", "state", "val_vqa_accuracy", "last_reported", "steps", "seconds",
            *[f"param:{k.name}" for k in knobs], "note"]
    lines = [*header, "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in ("val_vqa_accuracy", "last_reported") and r.get(k) is not None
                 else _fmt(r.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "trials.md").write_text("\n".join(lines) + "\n")


def _plot(study, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    importances = {}
    complete = [r for r in rows if r["state"] == "complete"]
    if len(complete) >= 4:
        try:
            import optuna

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError, ZeroDivisionError):  # too few distinct values to tell
            importances = {}
    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    for state, marker, color in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:orange")):
        pts = [(r["trial"], r["val_vqa_accuracy"] if state == "complete" else r["last_reported"])
               for r in rows if r["state"] == state]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state + (" (last report)" * (state == "pruned")))
    best = [(r["trial"], r["best_so_far"]) for r in rows if r["best_so_far"] is not None]
    if best:
        ax.step(*zip(*best), where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation VQA accuracy (%)")
    ax.set_title("vqakit tune: objective per trial")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if importances:
        ax = axes[0][1]
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:purple")
        ax.set_xlabel("importance (PED-ANOVA, complete trials)")
        ax.set_title("parameter importances")
    fig.tight_layout()
    fig.savefig(out / "tune.png", dpi=110)
    plt.close(fig)


def best_config(base: dict, trial, num_train: int, reports: int, out: Path) -> dict:
    """The best trial's config as a preset: its settings, its training length, a run directory of its own."""
    cfg = trial_config(base, trial.params, num_train, reports)
    cfg["train"]["out_dir"] = str(out / "best")
    for key in ("train.resume", "train.progress"):
        set_dotted(cfg, key, get_dotted(base, key))
    return cfg


def write_outputs(study, base: dict, knobs: list[Knob], num_train: int, reports: int, out: Path,
                  selection: str) -> dict:
    """``trials.csv``, ``trials.md``, ``tune.png`` and (once a trial completed) ``best_config.yaml``."""
    from optuna.trial import TrialState

    rows = _rows(study)
    states = [r["state"] for r in rows]
    header = [f"# vqakit tune, study {study.study_name!r}", "",
              f"{len(rows)} trials: {states.count('complete')} complete, {states.count('pruned')} pruned, "
              f"{states.count('fail')} failed, {states.count('running')} running.", "", selection]
    written = {"trials_csv": out / "trials.csv", "trials_md": out / "trials.md", "plot": out / "tune.png"}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = max(complete, key=lambda t: t.value)
        base_trials = [t for t in complete if t.user_attrs.get("base")]
        header += ["", f"Best: trial {best.number}, val VQA accuracy {best.value:.2f}"
                   + (f" (base config, trial {base_trials[0].number}: {base_trials[0].value:.2f})" if base_trials else "")
                   + ". Train it: `vqakit train --config " + str(out / "best_config.yaml") + "`."]
        cfg = best_config(base, best, num_train, reports, out)
        note = (f"# vqakit tune, study {study.study_name!r}: the best of {len(complete)} complete trials, "
                f"trial {best.number}, val VQA accuracy {best.value:.2f}\n# {selection}\n# searched: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
                + f"\n# vqakit train --config {out / 'best_config.yaml'}\n")
        (out / "best_config.yaml").write_text(note + yaml.safe_dump(cfg, sort_keys=False))
        written["best_config"] = out / "best_config.yaml"
    _write_tables(rows, knobs, out, header)
    _plot(study, rows, out)
    return written


def _keep_best_weights(study, out: Path) -> None:
    """Delete the weights of every trial run but the best (their config, logs and metadata stay)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    keep = f"trial-{max(complete, key=lambda t: t.value).number:03d}" if complete else None
    for run in sorted((out / "trials").glob("trial-*")):
        if run.name != keep:
            for weights in run.glob("checkpoint/*.safetensors"):
                weights.unlink()


# ---------------------------------------------------------------------------------------------------------------
# the search


class _QuietTraining:
    """Silence the per-run log lines of ``fit`` and Lightning while trials run (tune prints one line a trial)."""

    names = ("vqakit", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.levels = {n: logging.getLogger(n).level for n in self.names}
        for n in self.names:
            logging.getLogger(n).setLevel(logging.WARNING)
        self.hf = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the towers' load reports, once per trial
        hf_logging.disable_progress_bar()
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        for message in (".*does not have many workers.*", ".*smaller than the logging interval.*"):
            warnings.filterwarnings("ignore", message=message)

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        self.warnings.__exit__(*exc)
        hf_logging.set_verbosity(self.hf[0])
        if self.hf[1]:
            hf_logging.enable_progress_bar()
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


def next_trial_seconds(study, last: int = 3) -> float:
    """How long the next trial should take: the mean duration of the ``last`` completed trials (0 before any:
    the first trial always starts). Pruned trials are left out: the next one may run to the end."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.duration][-last:]
    return sum(t.duration.total_seconds() for t in complete) / len(complete) if complete else 0.0


def _comparable(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for key in TRIAL_ONLY_KEYS:
        if _has(cfg, key):
            set_dotted(cfg, key, None)
    return cfg


def run_search(
    base: dict,
    out_dir: str | Path = "runs/tune",
    space: str | Path | list[Knob] | None = None,
    trials: int | None = None,
    budget_minutes: float | None = None,
    seed: int = 0,
    storage: str | None = None,
    study_name: str = "tune",
    reports_per_trial: int = 4,
    pruner="median",
    startup_trials: int = 5,
    enqueue: list[dict] | None = None,
) -> dict:
    """Search hyperparameters around ``base`` (a nested ``{"model", "data", "train"}`` config); see the module
    docstring. Rerun with the same ``out_dir`` to resume. Returns a summary (best trial, counts, paths).

    Args:
        base: the base config.
        out_dir: where the study, the trial runs and the outputs go.
        space: a ``--space`` YAML file or a list of knobs (default: ``default_space(base)``).
        trials: stop when the study has this many complete + pruned trials.
        budget_minutes: wall time of the whole study (over its sessions); no trial starts that would not fit.
        seed: seed of the sampler.
        storage: Optuna storage URL (default ``sqlite:///{out_dir}/study.db``).
        study_name: the study's name in the storage.
        reports_per_trial: validations per trial reported to the pruner (and the trial's granularity of length).
        pruner: ``median``, ``none`` or an ``optuna.pruners.BasePruner``.
        startup_trials: random trials before TPE models the results (trial 0, the base config, counts).
        enqueue: settings ``{knob: value}`` to try first, after the base config.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from vqakit.train.run import fit

    if trials is None and budget_minutes is None:
        raise ValueError("give --trials (a count), --budget_minutes (wall time) or both: the search needs an end")
    if trials is not None and trials < 1:
        raise ValueError(f"--trials={trials} must be at least 1")
    if budget_minutes is not None and budget_minutes <= 0:
        raise ValueError(f"--budget_minutes={budget_minutes} must be > 0")
    if reports_per_trial < 1:
        raise ValueError(f"--reports_per_trial={reports_per_trial} must be at least 1")
    if startup_trials < 1:
        raise ValueError(f"--startup_trials={startup_trials} must be at least 1")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise ValueError(f"--pruner={pruner!r} is not one of {PRUNERS}")

    model_cfg, data_cfg, train_cfg = parse_config(base)  # a bad base fails here, before any trial
    base = {"model": asdict(model_cfg), "data": asdict(data_cfg), "train": asdict(train_cfg)}
    if data_cfg.val_fraction <= 0:
        raise ValueError("--data.val_fraction=0: tune selects on a validation split held out of the training data; "
                         "give a fraction, e.g. --data.val_fraction 0.1")
    if train_cfg.devices != 1 or train_cfg.num_nodes != 1 or train_cfg.strategy != "auto":
        raise ValueError(f"tune runs its trials in this process on one device: --train.devices={train_cfg.devices}, "
                         f"--train.num_nodes={train_cfg.num_nodes}, --train.strategy={train_cfg.strategy!r} are not "
                         "supported (use devices 1, num_nodes 1, strategy auto)")
    if isinstance(space, (str, Path)):
        knobs = load_space(space, base)
    else:
        knobs = list(space) if space is not None else default_space(base)
    if not knobs:
        raise ValueError("the search space is empty: the base config has none of the default knobs; give --space")
    for k in knobs:
        if k.name != STEPS_MULTIPLIER and not _has(base, k.name):
            raise ValueError(f"knob {k.name!r} is not a key of the base config")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{out / 'study.db'}"
    num_train, num_val = count_questions(data_cfg)
    selection = (f"Selection: val VQA accuracy (soft score of the top answer, %) on {num_val:,} questions held out of "
                 f"{data_cfg.dataset} {data_cfg.train_split!r} (data.val_fraction={data_cfg.val_fraction}, "
                 f"data.seed={data_cfg.seed}); trials train on the other {num_train:,}. The evaluation split "
                 f"{data_cfg.eval_split!r} is never used by the search.")
    print(f"search space ({len(knobs)} knobs):\n{format_space(knobs)}")
    print(selection)
    write_space(knobs, out / "space.yaml")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
        rdb = RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S,
                         heartbeat_stale_trial_callback=retry)
    if pruner == "median":  # at least two complete trials to take a median of, then from the first report on
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    elif pruner == "none":
        pruner = optuna.pruners.NopPruner()
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    study = optuna.create_study(study_name=study_name, storage=rdb, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)

    recorded = {"base": _comparable(base), "space": [asdict(k) for k in knobs], "reports_per_trial": reports_per_trial,
                "num_train_questions": num_train}
    if not study.get_trials(deepcopy=False):
        for key, value in recorded.items():
            study.set_user_attr(key, json.loads(json.dumps(value)))
        start = {}
        for k in knobs:
            value = 1.0 if k.name == STEPS_MULTIPLIER else get_dotted(base, k.name)
            if k.contains(value):
                start[k.name] = value
        study.enqueue_trial(start, user_attrs={"base": True})
        for params in enqueue or []:
            study.enqueue_trial(params)
    else:
        for key, value in recorded.items():
            if study.user_attrs.get(key) != json.loads(json.dumps(value)):
                raise ValueError(f"{url} holds study {study_name!r} made with another {key.replace('_', ' ')}; "
                                 f"resume it with the same settings, or start a new one with another --out_dir "
                                 f"or --study_name")
        dead = recover_dead_trials(study, rdb, out, retry)
        if dead:
            print(f"trials {dead} were running when their process died: marked failed and queued again")
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        print(f"resuming study {study_name!r} ({url}): {len(done)} finished trials kept")

    budget_s = None if budget_minutes is None else 60 * budget_minutes
    spent_before = float(study.user_attrs.get("seconds_spent", 0.0))
    session_start = time.monotonic()
    if budget_s is not None:
        print(f"budget: {budget_minutes:g} min" + (f", {spent_before / 60:.1f} spent in earlier sessions"
                                                  if spent_before else ""))

    def spent() -> float:
        return spent_before + time.monotonic() - session_start

    def record_time() -> None:
        study.set_user_attr("seconds_spent", round(spent(), 1))

    def stop_reason() -> str | None:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if trials is not None and len(finished) >= trials:
            return f"{len(finished)} finished trials (--trials {trials})"
        failed = [t.state for t in study.get_trials(deepcopy=False)[-3:]]
        if len(failed) == 3 and all(s == TrialState.FAIL for s in failed):
            return "the last 3 trials failed"
        if budget_s is not None:
            estimate = next_trial_seconds(study)
            if spent() + estimate > budget_s:
                return (f"the next trial (~{estimate:.0f} s, the mean of the last completed ones) would not fit in "
                        f"the {max(0.0, budget_s - spent()):.0f} s left of the {budget_minutes:g} min budget")
        return None

    def objective(trial) -> float:
        trial.set_user_attr("worker", worker_id())
        params = {k.name: k.suggest(trial) for k in knobs}
        cfg = trial_config(base, params, num_train, reports_per_trial)
        steps = cfg["train"]["max_steps"]
        trial.set_user_attr("steps", steps)
        run_dir = out / "trials" / f"trial-{trial.number:03d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg["train"].update(out_dir=str(run_dir), resume=False, progress=False)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        print(f"trial {trial.number}: started, {steps} steps; {shown}", flush=True)
        model, data, train = parse_config(cfg)
        reporter = TrialReporter(trial, steps, reports_per_trial, on_report=record_time)
        try:
            with _QuietTraining():
                fit(model, data, train, evaluate=False, callbacks=[reporter])
        except optuna.TrialPruned:
            trial.set_user_attr("pruned_at_step", reporter.pruned_at)
            raise
        except Exception as err:  # recorded for the tables; Optuna marks the trial failed
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        finally:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # Lightning's resume state: not needed
            trial.set_user_attr("validations", reporter.history)
        return reporter.final

    def after_trial(study, trial) -> None:
        record_time()
        best = study.best_trial if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) \
            else None
        state = trial.state.name.lower()
        result = f"val {trial.value:.2f}" if trial.value is not None else state
        if trial.state == TrialState.PRUNED:
            result = f"pruned at step {trial.user_attrs.get('pruned_at_step')}"
        elif trial.state == TrialState.FAIL:
            result = f"failed: {trial.user_attrs.get('error', '?')}".splitlines()[0]
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        print(f"trial {trial.number}: {result} in {seconds:.0f} s"
              + (f" (best {best.value:.2f}, trial {best.number})" if best else ""), flush=True)
        write_outputs(study, base, knobs, num_train, reports_per_trial, out, selection)
        reason = stop_reason()
        if reason:
            print(f"stopping: {reason}")
            study.stop()

    reason = stop_reason()
    if reason:
        print(f"nothing to run: {reason}")
    else:
        study.optimize(objective, callbacks=[after_trial], catch=(RuntimeError, ValueError), gc_after_trial=True)
    record_time()
    written = write_outputs(study, base, knobs, num_train, reports_per_trial, out, selection)
    _keep_best_weights(study, out)
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    summary = {"study": study_name, "storage": url, "trials": {k: v for k, v in counts.items() if v},
               "seconds_spent": round(spent(), 1), **{k: str(v) for k, v in written.items()}}
    if "best_config" in written:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=round(best.value, 4), best_params=best.params)
        print(f"best: trial {best.number}, val VQA accuracy {best.value:.2f}: "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
        print(f"train it: vqakit train --config {written['best_config']}")
    print(f"wrote {', '.join(str(p) for p in written.values())}, {out / 'space.yaml'}")
    return summary
