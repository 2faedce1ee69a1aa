"""Tests for vqakit.data.stats and `vqakit stats`: distributions and blind baselines, checked by hand."""

import json

import pytest

from vqakit.cli import main
from vqakit.data.example import Example
from vqakit.data.stats import baseline_accuracies, dataset_stats, fit_priors


def _ex(qid, question, answer, qtype, atype="other"):
    return Example(image=f"{qid}.png", question=question, question_id=qid, image_id=qid // 2,
                   answers=[answer] * 10, answer_type=atype, question_type=qtype)


TRAIN = [
    _ex(0, "Is it red?", "yes", "is it", "yes/no"),
    _ex(1, "Is it red?", "yes", "is it", "yes/no"),
    _ex(2, "Is it blue?", "no", "is it", "yes/no"),
    _ex(3, "What color is it?", "red", "what color"),
    _ex(4, "What color is it?", "red", "what color"),
    _ex(5, "What shape is it?", "circle", "what shape"),
]


def test_priors_and_baselines():
    priors = fit_priors(TRAIN)
    assert priors["most_common"] in ("yes", "red")  # a tie of 2; both are right
    assert priors["per_question_type"] == {"is it": "yes", "what color": "red", "what shape": "circle"}
    assert priors["per_question"]["is it blue"] == "no"
    test = [_ex(10, "Is it blue?", "no", "is it", "yes/no"), _ex(11, "What shape is it?", "circle", "what shape"),
            _ex(12, "Is it green?", "yes", "is it", "yes/no"), _ex(13, "How many?", "2", "how many", "number")]
    b = baseline_accuracies(TRAIN, test)
    # type prior: yes (wrong), circle (right), yes (right), unknown type -> most common (wrong) = 50%
    assert b["question_type_prior"]["vqa_accuracy"] == 50.0
    # question prior: no (right), circle (right), unseen -> type prior yes (right), wrong = 75%
    assert b["question_prior"]["vqa_accuracy"] == 75.0
    assert b["question_prior"]["per_answer_type"] == {"number": 0.0, "other": 100.0, "yes/no": 100.0}


def test_dataset_stats_counts():
    s = dataset_stats(TRAIN)
    assert s["questions"] == 6 and s["images"] == 3 and s["distinct_answers"] == 4
    assert s["answer_types"] == {"other": 3, "yes/no": 3}
    assert s["question_length"]["histogram"] == {3: 3, 4: 3}
    assert s["top_question_types"][0] == ("is it", 3)
    assert s["baselines"]["question_prior"]["vqa_accuracy"] == 100.0  # fit and scored on the same data


def test_stats_cli(tmp_path, capsys):
    from vqakit.data.procedural import write_shapes_rel

    root = write_shapes_rel(tmp_path / "d", num_train_images=20, num_val_images=10, questions_per_image=5)
    main(["stats", "--data.dataset", "shapes-rel", "--data.root", str(root), "--data.eval_split", "val",
          "--out_dir", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "blind baselines" in out and "question_type_prior" in out
    saved = json.loads((tmp_path / "s" / "shapes-rel-val.json").read_text())
    assert saved["questions"] == 50 and set(saved["answer_types"]) == {"yes/no", "number", "other"}
    assert (tmp_path / "s" / "shapes-rel-val.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["stats", "--data.dataset", "nope"])
