"""``vqakit tune``: the search space, trial lengths, and end-to-end searches on tiny towers and a few dozen
easy-VQA questions (outputs, resume after a kill, pruning, the best config trains)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from vqakit.cli import main  # noqa: E402
from vqakit.experiments.tune import (  # noqa: E402
    STEPS_MULTIPLIER,
    Knob,
    default_space,
    load_space,
    next_trial_seconds,
    run_search,
    trial_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _preset(name: str) -> dict:
    from dataclasses import asdict

    from vqakit.experiments.tune import parse_config

    cfg = yaml.safe_load((ROOT / "vqakit" / "configs" / f"{name}.yaml").read_text())
    model, data, train = parse_config(cfg)
    return {"model": asdict(model), "data": asdict(data), "train": asdict(train)}


def test_default_space_follows_the_base_config():
    rel = {k.name: k for k in default_space(_preset("shapes-rel"))}
    assert set(rel) == {"train.lr", "model.hidden_size", "model.num_fusion_layers", "model.reasoning_steps",
                        "model.dropout", "train.weight_decay", "train.batch_size", STEPS_MULTIPLIER}
    assert rel["train.lr"].log and rel["train.lr"].low == pytest.approx(0.0005) and rel["train.lr"].high == 0.008
    assert rel["model.hidden_size"].choices == [64, 128, 256] and rel["train.batch_size"].choices == [80, 160, 320]
    assert (rel["model.reasoning_steps"].low, rel["model.reasoning_steps"].high) == (2, 6)
    assert (rel["model.num_fusion_layers"].low, rel["model.num_fusion_layers"].high) == (0, 2)  # 1 +- 1
    assert rel["model.reasoning_steps"].kind == "int" and rel["model.dropout"].kind == "float"
    short = _preset("shapes-rel")
    short["model"].update(reasoning_steps=3, free_steps=1)  # never fewer steps than free ones plus one
    assert {k.name: k for k in default_space(short)}["model.reasoning_steps"].low == 2

    easy = _preset("easy-vqa")
    assert "model.reasoning_steps" not in {k.name for k in default_space(easy)}  # not the relational fusion
    easy["train"]["vision"] = "lora"
    assert "train.lora_lr" in {k.name for k in default_space(easy)}
    del easy["model"]["dropout"]  # a knob only where the base has it
    assert "model.dropout" not in {k.name for k in default_space(easy)}


def test_space_and_base_of_the_flat_tower_names_are_read_in_the_nested_names(tmp_path):
    from dataclasses import asdict

    from vqakit.experiments.tune import parse_config

    flat = yaml.safe_load((ROOT / "vqakit" / "configs" / "easy-vqa.yaml").read_text())
    flat["model"] = {"image_size": 64, "vision_multiscale": True, "fusion": "cross-attention"}
    model, _, _ = parse_config(flat)
    assert (model.vision.image_size, model.vision.multiscale) == (64, True)
    space = tmp_path / "space.yaml"
    space.write_text("model.image_size: {choices: [32, 64]}\n")
    assert [k.name for k in load_space(space, _preset("easy-vqa"))] == ["model.vision.image_size"]


def test_space_file_is_validated(tmp_path):
    base = _preset("easy-vqa")
    good = tmp_path / "space.yaml"
    good.write_text("train.lr: {low: 1e-4, high: 1e-2, log: true}\nmodel.hidden_size: {choices: [64, 128]}\n"
                    "steps_multiplier: {low: 0.5, high: 2.0, step: 0.5}\n")
    knobs = load_space(good, base)
    assert [k.name for k in knobs] == ["train.lr", "model.hidden_size", STEPS_MULTIPLIER]
    assert knobs[0].low == 1e-4 and knobs[0].describe() == "log-uniform in [0.0001, 0.01]"  # YAML's "1e-4" string

    cases = {
        "model.hiden_size: {choices: [1, 2]}\n": "'model.hiden_size' is not a key of the base config",
        "train.lr: {low: 0.1, high: 0.01}\n": "low=0.1 is above high=0.01",
        "train.lr: {low: 0, high: 0.01, log: true}\n": "log=true needs low > 0",
        "train.lr: {low: 1e-3, hi: 0.01}\n": "has ['hi']",
        "train.lr: 0.001\n": "expected {low, high} or {choices}",
        "train.max_steps: {low: 1, high: 9}\n": "search the training length with 'steps_multiplier'",
        "train.lr: {low: small, high: 0.01}\n": "low='small' is not a number",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_space(bad, base)
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        load_space(tmp_path / "no_such.yaml", base)


def test_trial_length_is_a_multiple_of_the_base_plan():
    base = _preset("shapes-rel")  # max_steps 3700 at batch 160
    cfg = trial_config(base, {STEPS_MULTIPLIER: 1.0}, num_train=190_000, reports=4)
    assert cfg["train"]["max_steps"] == 3700 and cfg["train"]["val_every_n_steps"] == 925
    # twice the questions at twice the batch: the same steps; epochs grow to cover max_steps
    cfg = trial_config(base, {STEPS_MULTIPLIER: 2.0, "train.batch_size": 320}, num_train=190_000, reports=4)
    assert cfg["train"]["max_steps"] == 3700 and cfg["train"]["epochs"] * -(-190_000 // 320) >= 3700
    cfg = trial_config(base, {STEPS_MULTIPLIER: 0.5, "model.hidden_size": 64}, num_train=190_000, reports=3)
    assert cfg["train"]["max_steps"] == 1851 and cfg["train"]["max_steps"] % 3 == 0  # 1850 rounded up to 3s
    assert cfg["model"]["hidden_size"] == 64 and base["model"]["hidden_size"] == 128  # the base is not changed
    easy = _preset("easy-vqa")  # epochs only (5 x 10 steps of 128)
    assert trial_config(easy, {}, num_train=1280, reports=5)["train"]["max_steps"] == 50


def test_budget_estimate_is_the_mean_of_the_last_complete_trials():
    study = optuna.create_study(direction="maximize")
    start = datetime.datetime(2026, 1, 1)
    for seconds, state in ((100, "COMPLETE"), (10, "PRUNED"), (40, "COMPLETE"), (60, "COMPLETE"), (80, "COMPLETE")):
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=getattr(optuna.trial.TrialState, state),
            value=1.0 if state == "COMPLETE" else None, datetime_start=start,
            datetime_complete=start + datetime.timedelta(seconds=seconds), params={}, distributions={},
            user_attrs={}, system_attrs={}, intermediate_values={1: 0.5}))
    assert next_trial_seconds(study) == pytest.approx(60.0)  # (40 + 60 + 80) / 3: pruned ones left out
    assert next_trial_seconds(optuna.create_study()) == 0.0


def test_knob_errors_name_the_knob():
    with pytest.raises(ValueError, match="'train.lr': give low and high"):
        Knob("train.lr")
    with pytest.raises(ValueError, match="log and step cannot be combined"):
        Knob("train.lr", low=1e-3, high=1e-2, log=True, step=1e-3)
    assert Knob("x", low=0, high=4, step=2).contains(2) and not Knob("x", low=0, high=4, step=2).contains(3)


# ---------------------------------------------------------------------------------------------------------------
# end to end, on tiny towers


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One feature cache for the searches of this module (the towers are the same)."""
    return str(tmp_path_factory.mktemp("tune-cache"))


def _tiny_base_args(model_args, cache, *extra) -> list[str]:
    return [*model_args, "--data.limit", "60", "--data.val_fraction", "0.2", "--data.cache_dir", cache,
            "--train.max_steps", "2", "--train.batch_size", "16", *extra]


def _study(out: Path):
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")


def test_search_resumes_after_a_kill_and_its_best_config_trains(tiny_model_args, cache_dir, tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["tune", *_tiny_base_args(tiny_model_args, cache_dir), "--trials", "3", "--reports_per_trial", "2",
            "--out_dir", str(out)]
    # 1. a search in its own process, killed (SIGKILL: no clean-up) once the second trial has started
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vqakit.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("trial 1: started"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)  # reaped: its pid is gone
    proc.stdout.close()
    assert any(line.startswith("trial 0: val") for line in seen), "".join(seen[-30:])
    assert "never used by the search" in "".join(seen)
    first = _study(out).trials
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    trial0_end = first[0].datetime_complete
    trial0_config = (out / "trials" / "trial-000" / "config.yaml").stat().st_mtime_ns

    # 2. rerun: the dead trial is failed and retried, trial 0 is kept, the study grows to 3 finished trials
    main(args)
    printed = capsys.readouterr().out
    assert "trials [1] were running when their process died" in printed and "1 finished trials kept" in printed
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].datetime_complete == trial0_end and trials[0].user_attrs["base"]
    assert (out / "trials" / "trial-000" / "config.yaml").stat().st_mtime_ns == trial0_config  # not rerun
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].params == trials[1].params
    assert not (out / "trials" / "trial-001").exists()
    assert all(set(t.intermediate_values) == {1, 2} for t in trials if t.state.name == "COMPLETE")

    # 3. every output
    assert {p.name for p in out.iterdir()} >= {"best_config.yaml", "trials.csv", "trials.md", "tune.png",
                                               "study.db", "space.yaml", "trials"}
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [r["state"] for r in rows] == ["complete", "fail", "complete", "complete"]
    assert "died while it ran" in rows[1]["note"] and rows[2]["note"] == "retry of trial 1"
    assert set(rows[0]) >= {"val_vqa_accuracy", "steps", "seconds", "param:train.lr", f"param:{STEPS_MULTIPLIER}"}
    md = (out / "trials.md").read_text()
    assert "4 trials: 3 complete, 0 pruned, 1 failed" in md and "| base config |" in md
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert load_space(out / "space.yaml", _preset("easy-vqa"))  # the recorded space reads back as --space
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    kept = [p.parent.parent.name for p in (out / "trials").glob("*/checkpoint/model.safetensors")]
    assert kept == [f"trial-{best.number:03d}"]  # only the best trial keeps its weights

    # 4. a finished study: nothing to run; another space for the same study is refused
    main(args)
    assert "nothing to run: 3 finished trials (--trials 3)" in capsys.readouterr().out
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    with pytest.raises(SystemExit):
        main([*args, "--space", str(space)])
    assert "made with another space" in capsys.readouterr().err

    # 5. the best config is a preset that trains, and it reproduces the best trial's validation score
    config = yaml.safe_load((out / "best_config.yaml").read_text())
    assert config["train"]["out_dir"] == str(out / "best")
    main(["train", "--config", str(out / "best_config.yaml"), "--evaluate", "false", "--train.progress", "false"])
    meta = json.loads((out / "best" / "checkpoint" / "training_metadata.json").read_text())
    assert meta["steps"] == best.user_attrs["steps"]
    assert 100 * meta["validation"]["val/vqa_score"] == pytest.approx(best.value, abs=0.01)


def test_median_pruner_stops_a_hopeless_trial(tiny_model_args, cache_dir, tmp_path, capsys):
    from dataclasses import asdict

    from vqakit.data.config import DataConfig
    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.train.config import TrainConfig

    fields: dict = {}
    for flag, value in zip(tiny_model_args[::2], tiny_model_args[1::2]):  # --model.vision.name X -> {vision: {name}}
        *parents, name = flag.removeprefix("--model.").split(".")
        node = fields
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = int(value) if value.isdigit() else value
    model = TwoTowerConfig(**fields, dropout=0.0)
    base = {"model": asdict(model),
            "data": asdict(DataConfig(limit=160, val_fraction=0.25, cache_dir=cache_dir)),
            "train": asdict(TrainConfig(max_steps=6, batch_size=16, lr=0.03))}
    # trial 0: the base (lr 0.03) learns question types within 2 steps; trial 1: lr 1e-9 cannot learn
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    summary = run_search(base, tmp_path / "tune", space=[Knob("train.lr", low=1e-9, high=0.1, log=True)], trials=2,
                         reports_per_trial=3, pruner=pruner, enqueue=[{"train.lr": 1e-9}])
    trials = _study(tmp_path / "tune").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], capsys.readouterr().out
    assert trials[1].params == {"train.lr": 1e-9} and trials[1].user_attrs["pruned_at_step"] == 2
    assert list(trials[1].intermediate_values) == [1]  # stopped at its first report, 2 of 6 steps
    assert trials[1].intermediate_values[1] < trials[0].intermediate_values[1]
    assert summary["best_trial"] == 0 and summary["trials"] == {"complete": 1, "pruned": 1}
    assert "pruned at step 2" in (tmp_path / "tune" / "trials.md").read_text()


def test_bad_searches_are_clear_errors(tiny_model_args, tmp_path, capsys):
    cases = {
        ("--data.val_fraction", "0", "--trials", "2"): "--data.val_fraction=0: tune selects on a validation split",
        ("--train.max_steps", "2"): "give --trials (a count), --budget_minutes (wall time) or both",
        ("--trials", "2", "--pruner", "hyperband"): "--pruner='hyperband' is not one of ('median', 'none')",
        ("--trials", "2", "--train.devices", "2"): "tune runs its trials in this process on one device",
    }
    for extra, message in cases.items():
        with pytest.raises(SystemExit):
            main(["tune", *tiny_model_args, "--out_dir", str(tmp_path), *extra])
        assert message in capsys.readouterr().err


def test_recipe_auto_is_the_base_of_a_search(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # --print_config: the resolved base, then exit 0
        main(["tune", "--recipe", "auto", "--data.limit", "60", "--out_dir", str(tmp_path / "tune"), "--trials", "2",
              "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    recipe = yaml.safe_load((tmp_path / "tune" / "recipe.yaml").read_text())
    resolved = yaml.safe_load(printed[printed.index("model:"):])
    assert resolved["model"]["fusion"] == recipe["model"]["fusion"] and resolved["trials"] == 2
    assert resolved["train"]["max_steps"] == recipe["train"]["max_steps"]
