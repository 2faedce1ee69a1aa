"""Experiment tracking: MLflow (local file store) and W&B (offline) through Lightning's loggers, and the up-front
errors for an unreachable tracking server, a missing W&B key and an unknown tracker."""

from __future__ import annotations

import json
import socket

import pytest

from vqakit.cli import main
from vqakit.train.config import TrainConfig
from vqakit.train.tracking import check_trackers, logger_names


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _train(model_args, tmp_path, *extra):
    main(["train", *model_args, "--data.limit", "24", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(tmp_path / "run"), "--train.epochs", "1", "--train.batch_size", "2",  # 12 steps
          "--train.progress", "false", *extra])  # fmt: skip


def test_mlflow_and_wandb_receive_config_plan_metrics_and_the_evaluation(tiny_model_args, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    _train(tiny_model_args, tmp_path, "--train.logger", "csv,mlflow,wandb", "--train.tracking_uri", store,
           "--train.experiment", "tiny", "--train.run_name", "tiny-run")
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "checkpoint" / "eval-easy-vqa-test" / "metrics.json").read_text())
    assert (run_dir / "logs" / "metrics.csv").is_file()  # csv still there next to the trackers

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train/batch_size"] == "2" and params["data/dataset"] == "easy-vqa"  # the resolved config
    assert int(params["plan/total_steps"]) >= 3 and params["plan/num_train_questions"]  # the training plan
    assert "train/loss" in run.data.metrics  # step metrics
    assert run.data.metrics["eval/vqa_accuracy"] == metrics["vqa_accuracy"]  # the final evaluation
    for t, v in metrics["per_answer_type"].items():
        assert run.data.metrics[f"eval/per_answer_type/{t.replace('/', '_')}"] == v  # yes/no: yes_no
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "metrics.json", "results.json", "config.yaml"} <= artifacts

    # W&B offline: the run's records (config, history, summary) are protobufs in run-<id>.wandb, for `wandb sync`;
    # wandb >= 0.19 has no Python reader of that file, so the test looks for the logged keys and values in it
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"eval/vqa_accuracy" in data and b"train/loss" in data and b"eval/per_answer_type/other" in data
    assert json.dumps(metrics["vqa_accuracy"]).encode() in data
    assert b"total_steps" in data and b"easy-vqa" in data and b"batch_size" in data  # the plan and the config


def test_an_unreachable_mlflow_server_fails_before_training(tiny_model_args, tmp_path, capsys):
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(SystemExit) as exc:
        _train(tiny_model_args, tmp_path, "--train.logger", "mlflow", "--train.tracking_uri", uri)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vqakit: error: --train.logger mlflow: tracking server {uri} is unreachable")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_mlflow_uri_from_the_environment(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(RuntimeError, match="is unreachable"):
        check_trackers(TrainConfig(logger="mlflow"))
    check_trackers(TrainConfig(logger="mlflow", tracking_uri=f"file:{tmp_path}/mlruns"))  # a local store: no server


def test_wandb_online_without_a_key_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match=r"no W&B API key \(set WANDB_API_KEY or run `wandb login`\)"):
        check_trackers(TrainConfig(logger="wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(TrainConfig(logger="wandb"))


def test_logger_values():
    assert logger_names("csv,tensorboard") == ["csv", "tensorboard"] and logger_names("wandb") == ["wandb"]
    with pytest.raises(ValueError, match=r"--train.logger='csv,neptune': \['neptune'\] not a tracker"):
        TrainConfig(logger="csv,neptune")


def test_validation_is_scored_per_question_family_while_training(tiny_model_args, tmp_path):
    """Each group of the carved validation split (question type where the data gives 2-12 of them, else answer
    type) gets its own ``val/vqa_score_per_type/<group>`` curve; the groups' scores weighted by their sizes give the
    overall score, and the run's metadata records the last of each."""
    import csv

    import yaml

    from vqakit.data.config import DataConfig, split_validation
    from vqakit.train.run import _load_train_examples
    from vqakit.train.system import validation_groups
    from vqakit.train.tracking import metric_keys

    _train(tiny_model_args, tmp_path, "--data.val_fraction", "0.5")
    run_dir = tmp_path / "run"
    data = DataConfig(**yaml.safe_load((run_dir / "config.yaml").read_text())["data"])
    _, val = split_validation(_load_train_examples(data, False)[0], data.val_fraction, data.seed)
    groups = validation_groups(val)
    assert groups is not None and len(set(groups)) >= 2
    keys = metric_keys(groups)
    rows = [r for r in csv.DictReader((run_dir / "logs" / "metrics.csv").open()) if r.get("val/vqa_score")]
    assert rows
    for row in rows:
        per_group = {g: float(row[f"val/vqa_score_per_type/{keys[g]}"]) for g in set(groups)}
        weighted = sum(groups.count(g) * s for g, s in per_group.items()) / len(groups)
        assert abs(weighted - float(row["val/vqa_score"])) < 1e-5
    meta = json.loads((run_dir / "checkpoint" / "training_metadata.json").read_text())
    assert {f"val/vqa_score_per_type/{keys[g]}" for g in set(groups)} <= set(meta["validation"])


def test_validation_groups_are_question_types_when_few_else_answer_types():
    from vqakit.data.example import Example
    from vqakit.train.system import MAX_VAL_GROUPS, validation_groups

    def ex(i, qtype, atype="other"):
        return Example(image="x.png", question="q?", question_id=i, image_id=i, answer_type=atype, question_type=qtype)

    families = [ex(0, "position", "yes/no"), ex(1, "counting", "number"), ex(2, "position", "other")]
    assert validation_groups(families) == ["position", "counting", "position"]
    many = [ex(i, f"type {i}", "yes/no" if i % 2 else "other") for i in range(MAX_VAL_GROUPS + 1)]
    assert validation_groups(many) == [e.answer_type for e in many]  # VQA v2's 65 types: too many
    untyped = [ex(0, "", "yes/no"), ex(1, "", "number")]
    assert validation_groups(untyped) == ["yes/no", "number"]
    assert validation_groups([ex(0, "", "other"), ex(1, "", "other")]) is None
