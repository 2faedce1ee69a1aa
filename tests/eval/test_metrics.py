"""Official VQA accuracy, compute_metrics, the prediction CSV and the failure summary."""

from __future__ import annotations

import csv
import json

import pytest

from vqakit.eval import (
    CSV_COLUMNS,
    PredictionRecord,
    compute_metrics,
    failure_summary,
    official_accuracy,
    per_question_accuracy,
    vqa_accuracy,
    write_predictions_csv,
)


def _leave_one_out(pred: str, gts: list[str]) -> float:
    """The evaluator's loop written out literally (no normalisation), to check the vectorised count."""
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1, float(sum(o == pred for o in others)) / 3))
    return float(sum(accs)) / len(accs)


# ----------------------------------------------------------------------------- vqa_accuracy


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_leave_one_out_values(k, expected):
    gts = ["cat"] * k + ["dog"] * (10 - k)
    if k in (0, 10):
        assert vqa_accuracy("cat", gts) == expected
    else:
        assert vqa_accuracy("cat", gts) == pytest.approx(expected)
        assert vqa_accuracy("cat", gts) == _leave_one_out("cat", gts)  # bit-identical to the literal loop


def test_answer_position_does_not_matter():
    gts = ["dog", "cat", "dog", "bird", "cat", "dog", "dog", "cat", "dog", "dog"]
    assert vqa_accuracy("cat", gts) == _leave_one_out("cat", gts) == pytest.approx(0.9)
    assert vqa_accuracy("bird", gts) == pytest.approx(0.3)


def test_fewer_than_ten_answers():
    assert vqa_accuracy("a dog", ["dog", "dog", "dog", "cat"]) == pytest.approx(0.75)  # (3 * 2/3 + 1) / 4
    assert vqa_accuracy("dog", ["dog"]) == 0.0  # a lone answer has no "others" to match


def test_unanimous_question_is_not_normalised():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes\t"] * 10) == 1.0  # whitespace is still cleaned
    assert vqa_accuracy("Yes", ["yes", "yes "] * 5) == 0.0  # equal once stripped: still unanimous


def test_mixed_question_is_normalised():
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Hot-Dog", ["hot dog", "hot - dog", "hotdog", "sandwich"]) == pytest.approx(0.5)
    assert vqa_accuracy("cat", ["a dog"] * 5 + ["dog"] * 5) == 0.0
    assert vqa_accuracy("The dog.", ["a dog"] * 5 + ["dog"] * 5) == 1.0


def test_vqa_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError, match="gt_answers is empty"):
        vqa_accuracy("yes", [])


def test_official_accuracy_rounds_like_the_evaluator():
    assert official_accuracy([1.0, 0.9, 0.0]) == 63.33
    assert official_accuracy([1.0, 0.0]) == 50.0
    assert official_accuracy([0.3] * 3) == 30.0
    with pytest.raises(ValueError, match="no per-question"):
        official_accuracy([])


# ----------------------------------------------------------------------------- compute_metrics

# Per record: accuracy, majority answer, exact match, top-5 hit.
RECORDS = [
    # unanimous, so "Yes" scores 0 officially, but the normalised exact match counts it: 0.0, yes, 1, 1
    PredictionRecord(1, "Is it on?", 10, "Yes", [("Yes", 0.9), ("no", 0.1)], ["yes"] * 10, "yes/no", "is the"),
    # 3 humans said "no": 0.9, yes, 0, 1
    PredictionRecord(
        2, "Is it off?", 10, "no", [("no", 0.6), ("yes", 0.4)], ["yes"] * 7 + ["no"] * 3, "yes/no", "is the"
    ),
    # "two" normalises to "2", said by 4: 1.0, 3, 0, 1
    PredictionRecord(
        3, "How many?", 11, "two", [("two", 0.5), ("3", 0.3)], ["2"] * 4 + ["3"] * 6, "number", "how many"
    ),
    # 2 humans: 0.6, blue, 0, 0
    PredictionRecord(
        4, "What color?", 12, "red", [("red", 0.7)], ["red"] * 2 + ["blue"] * 8, "other", "what color is the"
    ),
    # 1.0, blue, 1, 1
    PredictionRecord(
        5, "What color?", 13, "blue", [("blue", 0.8), ("red", 0.1)], ["blue"] * 10, "other", "what color is the"
    ),
    # mixed raw answers all normalise to "dog": 0.0, dog, 0, 1
    PredictionRecord(
        6, "What is it?", 14, "cat", [("cat", 0.5), ("dog", 0.4)], ["a dog"] * 5 + ["dog"] * 5, "other", "what is the"
    ),
]


def test_per_question_accuracy():
    assert per_question_accuracy(RECORDS) == pytest.approx([0.0, 0.9, 1.0, 0.6, 1.0, 0.0])


def test_compute_metrics_hand_computed():
    m = compute_metrics(RECORDS)
    json.dumps(m)  # serialisable
    assert m["num_questions"] == 6
    assert m["vqa_accuracy"] == 58.33  # 3.5 / 6
    assert m["per_answer_type"] == {"number": 100.0, "other": 53.33, "yes/no": 45.0}
    assert m["per_question_type"] == {"how many": 100.0, "is the": 45.0, "what color is the": 80.0, "what is the": 0.0}
    assert m["exact_match"] == 33.33
    assert m["exact_match_per_answer_type"] == {"number": 0.0, "other": 33.33, "yes/no": 50.0}
    assert m["top5_accuracy"] == 83.33
    # targets [yes yes 3 blue blue dog], predictions [yes no 2 red blue cat]: 8 classes; only "yes" and
    # "blue" have a true positive, each with precision 1, recall 1/2, F1 2/3; the other 6 score 0.
    assert m["num_classes"] == 8
    assert m["precision_macro"] == 25.0  # 2 / 8
    assert m["recall_macro"] == 12.5  # 1 / 8
    assert m["f1_macro"] == 16.67  # (4/3) / 8
    # weights = support: yes 2, blue 2, 3 1, dog 1
    assert m["precision_weighted"] == 66.67  # (2 + 2) / 6
    assert m["recall_weighted"] == 33.33  # (1 + 1) / 6, the exact match
    assert m["f1_weighted"] == 44.44  # (2 * 2/3 + 2 * 2/3) / 6


def test_compute_metrics_with_labels_maps_unknown_majority_to_unk():
    m = compute_metrics(RECORDS, labels=["yes", "no", "blue", "red", "2"])
    # "3" and "dog" become "<unk>" (2 false negatives, never predicted); "cat" becomes the out-of-labels
    # prediction class (1 false positive). In use: yes, no, blue, red, 2, <unk>, <unk_prediction> = 7.
    assert m["num_classes"] == 5
    assert m["majority_outside_labels"] == 33.33
    assert m["precision_macro"] == 28.57  # 2 / 7
    assert m["recall_macro"] == 14.29  # 1 / 7
    assert m["f1_macro"] == 19.05  # (4/3) / 7
    assert m["precision_weighted"] == 66.67  # supports: yes 2, blue 2, <unk> 2
    assert m["recall_weighted"] == 33.33
    assert m["f1_weighted"] == 44.44
    # the official numbers do not depend on labels
    assert m["vqa_accuracy"] == 58.33 and m["exact_match"] == 33.33


def test_unk_is_never_a_true_positive():
    # Both majority and prediction are outside labels and equal: still a miss for the class metrics.
    records = [
        PredictionRecord(1, "q", 1, "zebra", [("zebra", 1.0)], ["zebra"] * 10),
        PredictionRecord(2, "q", 1, "yes", [("yes", 1.0)], ["yes"] * 10),
    ]
    m = compute_metrics(records, labels=["yes", "no"])
    assert m["recall_weighted"] == 50.0
    assert m["exact_match"] == 100.0 and m["vqa_accuracy"] == 100.0


def test_compute_metrics_single_class_and_empty_top_k():
    records = [PredictionRecord(1, "q", 1, "yes", [], ["yes"] * 10, "yes/no", "is")]
    m = compute_metrics(records)
    assert m["top5_accuracy"] == 100.0  # falls back to the prediction
    assert m["f1_macro"] == 100.0 and m["precision_weighted"] == 100.0


def test_top5_uses_the_five_best_scores():
    top_k = [(f"a{i}", 0.1 * i) for i in range(7)]  # best first after sorting: a6 ... a2 are the top 5
    hit = PredictionRecord(1, "q", 1, "a6", top_k, ["a2"] * 10)
    miss = PredictionRecord(2, "q", 1, "a6", top_k, ["a1"] * 10)
    assert compute_metrics([hit])["top5_accuracy"] == 100.0
    assert compute_metrics([miss])["top5_accuracy"] == 0.0


def test_compute_metrics_errors():
    with pytest.raises(ValueError, match="no prediction records"):
        compute_metrics([])
    with pytest.raises(ValueError, match="question 9: no human answers"):
        compute_metrics([PredictionRecord(9, "q", 1, "yes", [], [])])
    with pytest.raises(ValueError, match="duplicate label 'yes'"):
        compute_metrics(RECORDS, labels=["yes", "no", "yes"])


# ----------------------------------------------------------------------------- CSV and failure summary


def test_write_predictions_csv(tmp_path):
    path = write_predictions_csv(RECORDS, per_question_accuracy(RECORDS), tmp_path / "out" / "predictions.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert list(CSV_COLUMNS) == [
        "question_id", "image_id", "question", "prediction", "score", "majority_answer",
        "vqa_accuracy", "answer_type", "question_type", "top5",
    ]  # fmt: skip
    assert len(rows) == 6
    r = rows[1]
    assert r["question_id"] == "2" and r["image_id"] == "10" and r["question"] == "Is it off?"
    assert r["prediction"] == "no" and r["score"] == "0.6000" and r["majority_answer"] == "yes"
    assert float(r["vqa_accuracy"]) == pytest.approx(0.9)
    assert r["answer_type"] == "yes/no" and r["question_type"] == "is the"
    assert r["top5"] == "no:0.6000|yes:0.4000"
    assert rows[2]["majority_answer"] == "3" and rows[5]["majority_answer"] == "dog"


def test_write_predictions_csv_without_score(tmp_path):
    record = PredictionRecord(1, "q, with comma", 1, "maybe", [("yes", 0.5)], ["yes"] * 10)
    path = write_predictions_csv([record], [0.0], tmp_path / "p.csv")
    row = next(csv.DictReader(path.open(newline="")))
    assert row["score"] == "" and row["question"] == "q, with comma"


def test_write_predictions_csv_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="5 accuracies for 6 records"):
        write_predictions_csv(RECORDS, [0.0] * 5, tmp_path / "p.csv")


def test_failure_summary():
    s = failure_summary(RECORDS)
    json.dumps(s)
    assert s["num_questions"] == 6 and s["num_wrong"] == 4
    assert s["top_confusions"] == [
        {"answer": "3", "prediction": "2", "count": 1},
        {"answer": "blue", "prediction": "red", "count": 1},
        {"answer": "dog", "prediction": "cat", "count": 1},
        {"answer": "yes", "prediction": "no", "count": 1},
    ]
    assert s["most_missed_answers"][1] == {"answer": "blue", "num_wrong": 1, "num_questions": 2}
    assert s["worst_question_types"][0] == {"question_type": "what is the", "num_questions": 1, "vqa_accuracy": 0.0}
    assert [t["question_type"] for t in s["worst_question_types"]] == [
        "what is the", "is the", "what color is the", "how many",
    ]  # fmt: skip


def test_failure_summary_counts_and_truncates():
    records = [PredictionRecord(i, "q", 1, "cat", [], ["dog"] * 10, "other", "what") for i in range(3)]
    records.append(PredictionRecord(9, "q", 1, "cow", [], ["dog"] * 10, "other", "what"))
    s = failure_summary(records, n=1)
    assert s["top_confusions"] == [{"answer": "dog", "prediction": "cat", "count": 3}]
    assert len(s["worst_question_types"]) == 1
    with pytest.raises(ValueError, match="n=0"):
        failure_summary(records, n=0)
