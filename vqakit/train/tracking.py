"""Experiment tracking: CSV / TensorBoard / MLflow / Weights & Biases through Lightning's loggers.

``--train.logger`` takes one name or a comma-separated list (``csv,mlflow``); ``both`` is ``csv,tensorboard``.
Every tracker receives the step metrics Lightning logs, the resolved configuration and the training plan as
parameters (:func:`log_run_start`), and the final evaluation as ``eval/*`` metrics (:func:`log_evaluation`).

- MLflow (https://mlflow.org/docs/latest/tracking.html, ``lightning.pytorch.loggers.MLFlowLogger``): the store is
  ``--train.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local file store ``file:./mlruns`` (allowed
  with ``MLFLOW_ALLOW_FILE_STORE=true``, which MLflow >= 3.7 requires). An ``http(s)`` server is connected to, and a
  local store opened, before anything loads, so a wrong URI fails in a second, not after training.
- W&B (https://docs.wandb.ai/, ``WandbLogger``): online runs need an API key (``WANDB_API_KEY`` or
  ``wandb login``) and a reachable ``$WANDB_BASE_URL`` (default https://api.wandb.ai), both checked up front;
  ``WANDB_MODE=offline`` writes the run under ``<out_dir>/wandb`` for a later ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

TRACKERS = ("csv", "tensorboard", "mlflow", "wandb")
_PACKAGES = {"mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}


def logger_names(value: str) -> list[str]:
    """The trackers of a ``--train.logger`` value.

    >>> logger_names("both"), logger_names("csv,mlflow"), logger_names("none")
    (['csv', 'tensorboard'], ['csv', 'mlflow'], [])
    """
    if value == "none":
        return []
    if value == "both":
        return ["csv", "tensorboard"]
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if bad or not names:
        raise ValueError(f"--train.logger={value!r}: {bad or 'empty'} not a tracker; use one of {TRACKERS}, "
                         "a comma-separated list of them (e.g. csv,mlflow), 'both' (csv,tensorboard) or 'none'")
    return list(dict.fromkeys(names))


def mlflow_tracking_uri(train) -> str:
    """``--train.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``file:./mlruns``."""
    return train.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "file:./mlruns"


def _allow_file_store(uri: str) -> None:
    """MLflow >= 3.7 refuses the ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``
    (https://mlflow.org/docs/latest/self-hosting/migrate-from-file-store); a ``file:`` URI is an explicit choice."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _reachable(url: str, what: str, fix: str) -> None:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=3):
            pass
    except OSError as e:
        raise RuntimeError(f"{what} {url} is unreachable ({e.strerror or e}); {fix}") from None


def _require(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"--train.logger {package} needs the {package} package: pip install {_PACKAGES[package]} "
                           "(or pip install 'vqakit[tracking]')")


def check_trackers(train) -> None:
    """Fail before anything loads when a tracker cannot work: package missing, server unreachable, no W&B key."""
    names = logger_names(train.logger)
    if "mlflow" in names:
        _require("mlflow")
        uri = mlflow_tracking_uri(train)
        if urlparse(uri).scheme in ("http", "https"):
            _reachable(uri, "--train.logger mlflow: tracking server",
                       "start it (mlflow server --port N) or use a local store: --train.tracking_uri file:./mlruns")
        else:  # a local store: open it now (a bad path or a store MLflow refuses fails here, not after training)
            _allow_file_store(uri)
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(tracking_uri=uri).get_experiment_by_name(train.experiment)
            except Exception as e:  # noqa: BLE001 - MLflow raises many types; the first line says what is wrong
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise RuntimeError(f"--train.logger mlflow: tracking store {uri} cannot be used ({first})") from None
    if "wandb" in names:
        _require("wandb")
        mode = os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled", "dryrun"):
            base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            if not os.environ.get("WANDB_API_KEY") and not _netrc_key(urlparse(base).hostname):
                raise RuntimeError("--train.logger wandb: no W&B API key (set WANDB_API_KEY or run `wandb login`), "
                                   "or log offline with WANDB_MODE=offline")
            _reachable(base, "--train.logger wandb: W&B server", "check the network or use WANDB_MODE=offline")


def _netrc_key(host: str | None) -> bool:
    try:
        return bool(host and netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def make_loggers(train, out: Path) -> list:
    """Lightning loggers for ``--train.logger`` (``[]`` for ``none``)."""
    loggers = []
    for name in logger_names(train.logger):
        if name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(out, name="logs", version=""))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(out, name="logs", version="tensorboard"))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            _allow_file_store(mlflow_tracking_uri(train))
            loggers.append(MLFlowLogger(experiment_name=train.experiment, run_name=train.run_name or out.name,
                                        tracking_uri=mlflow_tracking_uri(train)))
        else:
            from lightning.pytorch.loggers import WandbLogger

            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")
            loggers.append(WandbLogger(project=train.experiment, name=train.run_name or out.name, save_dir=str(out),
                                       offline=offline))
    return loggers


def log_run_start(loggers: list, resolved: dict, plan: dict) -> None:
    """The resolved configuration and the training plan, as every tracker's run parameters."""
    for lg in loggers:
        lg.log_hyperparams({**resolved, "plan": plan})


def metric_keys(names: list[str]) -> dict[str, str]:
    """Group names (answer or question types) as one level of a metric name each: ``/`` and other characters the
    trackers read as structure become ``_``, and names that then collide get their index in sorted order, the
    same in the validation curves and in the final evaluation.

    >>> metric_keys(["yes/no", "colour of the X", "yes_no"])
    {'colour of the X': 'colour of the X', 'yes/no': 'yes_no_1', 'yes_no': 'yes_no_2'}
    """
    names = sorted(set(names))
    keys = [re.sub(r"[^\w\-. ]", "_", n).strip() or "_" for n in names]
    return {n: k if keys.count(k) == 1 else f"{k}_{i}" for i, (n, k) in enumerate(zip(names, keys))}


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """The headline numbers of an evaluation as flat ``eval/*`` metrics; each type's score under its
    :func:`metric_keys`, as in the validation curves (``val/vqa_score_per_type/<type>``).

    >>> evaluation_metrics({"vqa_accuracy": 50.0, "per_answer_type": {"yes/no": 75.0}, "num_questions": 4})
    {'eval/vqa_accuracy': 50.0, 'eval/num_questions': 4.0, 'eval/per_answer_type/yes_no': 75.0}
    """
    flat = {f"eval/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    per_type = metrics.get("per_answer_type", {})
    keys = metric_keys(list(per_type))
    flat.update({f"eval/per_answer_type/{keys[t]}": float(v) for t, v in per_type.items()})
    return flat


def log_evaluation(loggers: list, metrics: dict | None, step: int, files: list[Path]) -> None:
    """The final evaluation as ``eval/*`` metrics (MLflow also stores ``files`` as artifacts); closes W&B runs."""
    for lg in loggers:
        kind = type(lg).__name__
        if kind not in ("MLFlowLogger", "WandbLogger"):
            continue
        if metrics:
            lg.log_metrics(evaluation_metrics(metrics), step=step)
        if kind == "MLFlowLogger":
            for f in files:
                if Path(f).is_file():
                    lg.experiment.log_artifact(lg.run_id, str(f))
        else:
            lg.experiment.finish()
