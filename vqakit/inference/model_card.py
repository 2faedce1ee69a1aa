"""The model card (``README.md``) of a checkpoint directory, in the Hugging Face Hub format.

A card is YAML front matter (the metadata the Hub indexes: https://huggingface.co/docs/hub/model-cards, with the
``model-index`` results format of https://github.com/huggingface/hub-docs/blob/main/modelcard.md) followed by
markdown: what the model is, how to load it, the command that trained it, its parameters, time to train and the
official VQA accuracy per answer type of every evaluation. Everything comes from files in the directory:
``config.json``, ``training_metadata.json`` and ``eval-*/metrics.json`` (plus the run's ``config.yaml``), so
training writes the card and ``evaluate`` refreshes it. The directory is then ready for
``huggingface-cli upload <user>/<name> <checkpoint>``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import yaml

from vqakit.models.checkpoint import FLAT_TOWER_KEYS
from vqakit.models.registry import MODEL_FAMILIES

logger = logging.getLogger("vqakit")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _description(model_type: str) -> str:
    """The registry's one-line description of a family (its ``model_type`` when it is not registered)."""
    family = MODEL_FAMILIES.get(model_type)
    return family.description if family is not None else model_type


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _evaluations(ckpt: Path, extra: dict | None) -> list[dict]:
    """Every scored evaluation of the checkpoint, one per (dataset, split), the freshest last."""
    found = {}
    for path in sorted(ckpt.glob("eval-*/metrics.json")):
        m = _read_json(path)
        if "vqa_accuracy" in m:
            found[(m.get("dataset"), m.get("split"))] = m
    if extra and "vqa_accuracy" in extra:
        found[(extra.get("dataset"), extra.get("split"))] = extra
    return list(found.values())


def _metric_entries(m: dict) -> list[dict]:
    entries = [{"type": "vqa_accuracy", "name": "VQA accuracy (official)", "value": m["vqa_accuracy"]}]
    entries += [{"type": "vqa_accuracy", "name": f"VQA accuracy ({t})", "value": v}
                for t, v in sorted(m.get("per_answer_type", {}).items())]
    entries += [{"type": key, "name": name, "value": m[key]} for key, name in (
        ("exact_match", "exact match"), ("top5_accuracy", "top-5 accuracy"), ("f1_macro", "F1 (macro)"))
        if key in m]  # fmt: skip
    return entries


def card_metadata(ckpt: str | Path, metrics: dict | None = None) -> dict:
    """The YAML front matter of the card of ``ckpt``: library, tags, datasets, metrics and ``model-index``."""
    ckpt = Path(ckpt)
    config = _read_json(ckpt / "config.json")
    model_type = config.get("model_type", "two_tower")
    evals = _evaluations(ckpt, metrics)
    bases = [v for k in ("vision.name", "text.name", "language_model", "model")
             if isinstance(v := _setting(config, k), str)]
    datasets = sorted({str(m["dataset"]) for m in evals if m.get("dataset")} | set(_run_datasets(ckpt)))
    meta = {
        "library_name": "vqakit",
        "pipeline_tag": "visual-question-answering",
        "tags": ["vqakit", "visual-question-answering", model_type.replace("_", "-"),
                 *[Path(b).name for b in bases if b]],
        "datasets": datasets,
        "metrics": ["accuracy"],
    }
    hub_bases = [b for b in bases if _HUB_ID.match(b) and not Path(b).exists()]
    if hub_bases:
        meta["base_model"] = hub_bases
    if evals:
        meta["model-index"] = [{
            "name": ckpt.resolve().parent.name or ckpt.resolve().name,
            "results": [{
                "task": {"type": "visual-question-answering", "name": "Visual Question Answering"},
                "dataset": {"name": str(m.get("dataset")), "type": str(m.get("dataset")), "split": str(m.get("split"))},
                "metrics": _metric_entries(m),
            } for m in evals],
        }]  # fmt: skip
    return meta


def _setting(config: dict, key: str):
    """``config``'s value at the dotted ``key`` (``vision.name``), also in a ``config.json`` of the earlier flat
    layout (``vision_tower``); ``None`` when it has none."""
    flat = {".".join(path): old for old, path in FLAT_TOWER_KEYS.items()}
    if flat.get(key) in config:
        return config[flat[key]]
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _run_datasets(ckpt: Path) -> list[str]:
    run_config = ckpt.parent / "config.yaml"
    try:
        data = (yaml.safe_load(run_config.read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [str(data["dataset"])] if isinstance(data, dict) and data.get("dataset") else []


def render_model_card(ckpt: str | Path, metrics: dict | None = None) -> str:
    """The full ``README.md`` text of the card of ``ckpt``."""
    ckpt = Path(ckpt)
    meta = card_metadata(ckpt, metrics)
    config = _read_json(ckpt / "config.json")
    training = _read_json(ckpt / "training_metadata.json")
    model_type = config.get("model_type", "two_tower")
    name = meta.get("model-index", [{}])[0].get("name") or ckpt.resolve().name
    lines = [f"# {name}", "", f"A vqakit visual question answering model: {_description(model_type)}."]
    arch = {k: v for k in ("vision.name", "text.name", "language_model", "model", "fusion", "vision.image_size",
                           "hidden_size") if (v := _setting(config, k)) is not None}
    if config.get("id2label"):
        arch["answers"] = len(config["id2label"])
    if arch:
        lines += ["", "| setting | value |", "|---|---|", *[f"| {k} | `{v}` |" for k, v in arch.items()]]

    lines += ["", "## How to load", "", "From the Hub: `huggingface-cli download <user>/<repo> --local-dir "
              f"{ckpt.name}` (uploaded with `huggingface-cli upload <user>/<repo> {ckpt.name}`), then:", "",
              "```python", "from vqakit.inference.generative import load_predictor", "",
              f'predictor = load_predictor("{ckpt.name}")  # this directory (or a local download of it)',
              'print(predictor.predict("image.jpg", "What color is the cube?"))', "```", "", "```bash",
              f'vqakit predict --checkpoint {ckpt.name} --image image.jpg --question "What color is the cube?"',
              f"vqakit serve --checkpoint {ckpt.name}   # REST API + web UI", "```"]

    lines += ["", "## Training", ""]
    if training:
        command = training.get("command")
        lines += ["Trained with:", "", "```bash", command or "vqakit train --config config.yaml", "```"]
        if not command:
            lines += ["", "(the resolved configuration of the run is `config.yaml` next to this directory)"]
        params = training.get("parameters", {})
        rows = [
            ("time to train", f"{training['time_to_train_s']:.1f} s" if "time_to_train_s" in training else None),
            ("epochs / steps", f"{training.get('epochs')} / {training.get('steps')}"),
            ("parameters (trainable / total)",
             f"{params['trainable']:,} / {params['total']:,}" if {"trainable", "total"} <= set(params) else None),
            ("strategies", ", ".join(f"{k}: {v}" for k, v in training.get("strategies", {}).items()) or None),
            ("training questions", training.get("num_train_questions")),
            ("validation questions", training.get("num_val_questions")),
            ("data fingerprint", training.get("data_fingerprint")),
            ("precision", training.get("precision")),
            ("torch / lightning",
             f"{training['torch']} / {training.get('lightning')}" if "torch" in training else None),
        ]
        lines += ["", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows if v is not None]]
    else:
        lines += ["No training_metadata.json in this directory: the training run is unknown."]

    evals = _evaluations(ckpt, metrics)
    lines += ["", "## Evaluation", ""]
    if evals:
        lines += ["Official VQA accuracy (https://visualqa.org/evaluation.html), percent:", ""]
        types = sorted({t for m in evals for t in m.get("per_answer_type", {})})
        lines += ["| dataset | split | questions | overall | " + " | ".join(types) + " |",
                  "|---|---|---|---|" + "---|" * len(types)]
        for m in evals:
            per = m.get("per_answer_type", {})
            cells = " | ".join(f"{per[t]:.2f}" if t in per else "" for t in types)
            lines.append(f"| {m.get('dataset')} | {m.get('split')} | {m.get('num_questions')} | "
                         f"{m['vqa_accuracy']:.2f} | {cells} |")
    else:
        lines += ["Not evaluated yet: `vqakit evaluate --checkpoint <this directory>` adds the results here."]
    lines += ["", "## Limitations", "",
              "Answers come from the training data's answer vocabulary (classifier) or decoder; accuracy outside "
              "the evaluated datasets is unmeasured."]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def write_model_card(ckpt: str | Path, metrics: dict | None = None) -> Path:
    """Write ``<ckpt>/README.md``; ``metrics``: a fresh evaluation to include (else the ``eval-*/metrics.json``)."""
    path = Path(ckpt) / "README.md"
    path.write_text(render_model_card(ckpt, metrics), encoding="utf-8")
    return path


def refresh_model_card(ckpt: str | Path, metrics: dict | None = None) -> Path | None:
    """:func:`write_model_card` for a checkpoint that may be read-only (then only a warning is logged)."""
    if not (Path(ckpt) / "config.json").is_file():
        return None
    try:
        return write_model_card(ckpt, metrics)
    except OSError as e:
        logger.warning("model card of %s not refreshed: %s", ckpt, e)
        return None
