"""Model cards: the YAML front matter parses (with yaml and as the Hugging Face Hub reads it) and holds the numbers
of metrics.json; the body has the command, parameters, time to train, per-answer-type accuracy and how to load."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from vqakit.inference.model_card import card_metadata, write_model_card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def trained(tiny_checkpoint, tmp_path):
    """A checkpoint directory as a training run leaves it: metadata, the run's config.yaml, one evaluation."""
    ckpt = tmp_path / "my-run" / "checkpoint"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt.parent / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "vqa-v2"}}))
    meta = {"time_to_train_s": 12.34, "epochs": 2, "steps": 40, "parameters": {"trainable": 41477, "total": 78937},
            "strategies": {"vision": "frozen", "text": "lora"}, "num_train_questions": 640, "num_val_questions": 32,
            "command": "vqakit train --config configs/vqa-v2.yaml --train.epochs 2", "torch": "2.13.0"}
    (ckpt / "training_metadata.json").write_text(json.dumps(meta))
    metrics = {"dataset": "vqa-v2", "split": "val", "num_questions": 96, "vqa_accuracy": 53.13,
               "per_answer_type": {"number": 31.25, "other": 44.17, "yes/no": 80.0}, "exact_match": 50.0,
               "top5_accuracy": 90.63, "f1_macro": 12.5}
    (ckpt / "eval-vqa-v2-val").mkdir()
    (ckpt / "eval-vqa-v2-val" / "metrics.json").write_text(json.dumps(metrics))
    return ckpt, meta, metrics


def test_front_matter_has_the_metrics_of_metrics_json(trained):
    ckpt, meta, metrics = trained
    text = write_model_card(ckpt).read_text()
    front = _front_matter(text)
    assert front["library_name"] == "vqakit" and front["pipeline_tag"] == "visual-question-answering"
    assert {"vqakit", "visual-question-answering", "two-tower"} <= set(front["tags"])
    assert front["datasets"] == ["vqa-v2"]
    (entry,) = front["model-index"]
    assert entry["name"] == "my-run"
    (result,) = entry["results"]
    assert result["task"]["type"] == "visual-question-answering"
    assert result["dataset"] == {"name": "vqa-v2", "type": "vqa-v2", "split": "val"}
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values["VQA accuracy (official)"] == metrics["vqa_accuracy"]
    assert {t: values[f"VQA accuracy ({t})"] for t in metrics["per_answer_type"]} == metrics["per_answer_type"]
    assert values["exact match"] == 50.0 and values["top-5 accuracy"] == 90.63

    body = text.split("---\n", 2)[2]
    assert meta["command"] in body and "12.3 s" in body and "41,477 / 78,937" in body
    assert "| vqa-v2 | val | 96 | 53.13 | 31.25 | 44.17 | 80.00 |" in body
    assert "load_predictor(" in body and "vqakit predict --checkpoint" in body


def test_the_hub_parses_the_card(trained):
    hub = pytest.importorskip("huggingface_hub")
    ckpt, _, metrics = trained
    card = hub.ModelCard.load(write_model_card(ckpt))
    assert card.data.library_name == "vqakit"
    results = {(r.metric_name, r.dataset_split): r.metric_value for r in card.data.eval_results}
    assert results[("VQA accuracy (official)", "val")] == metrics["vqa_accuracy"]
    assert results[("VQA accuracy (yes/no)", "val")] == metrics["per_answer_type"]["yes/no"]


def test_a_fresh_evaluation_replaces_the_older_one_of_the_same_split(trained):
    ckpt, _, metrics = trained
    fresh = {**metrics, "vqa_accuracy": 60.0}
    (entry,) = card_metadata(ckpt, fresh)["model-index"]
    assert [m["value"] for m in entry["results"][0]["metrics"] if m["name"] == "VQA accuracy (official)"] == [60.0]
    other = {**metrics, "dataset": "easy-vqa", "split": "test"}
    assert len(card_metadata(ckpt, other)["model-index"][0]["results"]) == 2


def test_an_untrained_unevaluated_checkpoint_says_so(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, ckpt)
    text = write_model_card(ckpt).read_text()
    front = _front_matter(text)
    assert "model-index" not in front and front["library_name"] == "vqakit"
    assert "training run is unknown" in text and "Not evaluated yet" in text
