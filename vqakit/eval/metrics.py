"""Evaluation of a set of predictions: official VQA accuracy plus classification diagnostics.

- ``vqa_accuracy`` and its per-answer-type / per-question-type breakdown follow the official evaluator
  (https://github.com/GT-Vision-Lab/VQA, see :mod:`vqakit.eval.vqa_accuracy`), reported like it in percent
  rounded to 2 decimals.
- ``exact_match`` / ``top5_accuracy`` compare the normalised prediction (resp. the normalised top 5) with the
  normalised majority answer of the humans (ties to the answer given first).
- Precision / recall / F1, macro and weighted, treat each answer string as a class and are computed with
  ``torchmetrics.functional.classification`` (https://lightning.ai/docs/torchmetrics/stable/): the target
  is the majority answer, the prediction is the normalised predicted answer. Macro averages run over the
  classes that occur as a target or a prediction (as scikit-learn does); weighted averages weight each
  class by its number of target questions.

  Classes are ``labels`` when given (normalised answers, e.g. ``AnswerVocab.answers``), else the union of
  majority answers and predictions. With ``labels``, a majority answer outside them becomes the extra class
  ``"<unk>"``, which the model can never predict: those questions always count against recall (and the
  wrongly predicted class's precision). A prediction outside ``labels`` (a generative model) becomes a
  second extra class, distinct from ``"<unk>"``, that is never a target: it is always a false positive.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

from vqakit.data.answers import majority_answer, normalize_answer
from vqakit.eval.vqa_accuracy import official_accuracy, vqa_accuracy

UNK = "<unk>"
CSV_COLUMNS = (
    "question_id",
    "image_id",
    "question",
    "prediction",
    "score",
    "majority_answer",
    "vqa_accuracy",
    "answer_type",
    "question_type",
    "top5",
)


@dataclass
class PredictionRecord:
    """One question with the model's answer, as the evaluation and the prediction CSV see it.

    Args:
        question_id: unique id of the question.
        question: the question text.
        image_id: id of the image.
        prediction: the predicted answer string (raw; it is normalised for scoring).
        top_k: the model's best answers with their scores, e.g. ``[("yes", 0.93), ("no", 0.05)]``.
        answers: the human answers (raw, up to 10).
        answer_type: ``yes/no``, ``number`` or ``other``.
        question_type: e.g. ``what color is the``.
    """

    question_id: int
    question: str
    image_id: int
    prediction: str
    top_k: list[tuple[str, float]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    answer_type: str = "other"
    question_type: str = ""


def _check(records: list[PredictionRecord]) -> None:
    if len(records) == 0:
        raise ValueError("no prediction records given; evaluate at least one question")
    for r in records:
        if not r.answers:
            raise ValueError(f"question {r.question_id}: no human answers; every record needs at least one")


def _top5(record: PredictionRecord) -> list[str]:
    """The record's 5 best normalised answers by score (its prediction when ``top_k`` is empty)."""
    if not record.top_k:
        return [normalize_answer(record.prediction)]
    ranked = sorted(record.top_k, key=lambda item: -item[1])[:5]  # stable: equal scores keep their order
    return [normalize_answer(a) for a, _ in ranked]


def per_question_accuracy(records: list[PredictionRecord]) -> list[float]:
    """The official VQA accuracy of each record, unrounded, in [0, 1]."""
    _check(records)
    return [vqa_accuracy(r.prediction, r.answers) for r in records]


def _grouped(keys: list[str], values: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for k, v in zip(keys, values):
        groups[k].append(v)
    return {k: official_accuracy(groups[k]) for k in sorted(groups)}


def _class_metrics(targets: list[str], preds: list[str], labels: list[str] | None) -> dict[str, float]:
    if labels is None:
        classes = sorted(set(targets) | set(preds))
        index = {c: i for i, c in enumerate(classes)}
        t = [index[a] for a in targets]
        p = [index[a] for a in preds]
    else:
        index = {}
        for i, c in enumerate(labels):
            if c in index:
                raise ValueError(f"labels: duplicate label {c!r} at positions {index[c]} and {i}")
            index[c] = i
        unk_target, unk_pred = len(labels), len(labels) + 1  # never equal, so "<unk>" is never a true positive
        classes = list(labels) + [UNK, "<unk_prediction>"]
        t = [index.get(a, unk_target) for a in targets]
        p = [index.get(a, unk_pred) for a in preds]
    num_classes = max(len(classes), 2)  # torchmetrics requires >= 2; an unused class is ignored by the averages
    t_ = torch.tensor(t, dtype=torch.long)
    p_ = torch.tensor(p, dtype=torch.long)
    out = {}
    for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        for average in ("macro", "weighted"):
            value = fn(p_, t_, num_classes=num_classes, average=average, validate_args=False)
            out[f"{name}_{average}"] = round(100 * float(value), 2)
    return out


def compute_metrics(records: list[PredictionRecord], labels: list[str] | None = None) -> dict:
    """Official VQA accuracy and classification diagnostics of ``records``, as a JSON-serialisable dict.

    Args:
        records: one :class:`PredictionRecord` per question.
        labels: the answer classes (normalised, e.g. ``AnswerVocab.answers``) for precision / recall / F1;
            ``None`` uses the union of majority answers and predictions. See the module docstring for how
            answers outside ``labels`` are counted.

    Returns:
        ``num_questions``; ``vqa_accuracy``, ``per_answer_type``, ``per_question_type`` (official, percent);
        ``exact_match``, ``exact_match_per_answer_type``, ``top5_accuracy``; ``precision_macro``,
        ``recall_macro``, ``f1_macro``, ``precision_weighted``, ``recall_weighted``, ``f1_weighted``;
        ``num_classes`` and, with ``labels``, ``majority_outside_labels``. All percentages have 2 decimals.

    >>> r = PredictionRecord(1, "Is it red?", 7, "Yes", answers=["yes"] * 9 + ["no"], answer_type="yes/no")
    >>> m = compute_metrics([r])
    >>> m["vqa_accuracy"], m["exact_match"], m["per_answer_type"]
    (100.0, 100.0, {'yes/no': 100.0})
    """
    accs = per_question_accuracy(records)
    majority = [majority_answer(r.answers) for r in records]
    preds = [normalize_answer(r.prediction) for r in records]
    exact = [float(p == m) for p, m in zip(preds, majority)]
    top5 = [float(m in _top5(r)) for r, m in zip(records, majority)]
    answer_types = [r.answer_type for r in records]

    metrics: dict = {
        "num_questions": len(records),
        "vqa_accuracy": official_accuracy(accs),
        "per_answer_type": _grouped(answer_types, accs),
        "per_question_type": _grouped([r.question_type for r in records], accs),
        "exact_match": official_accuracy(exact),
        "exact_match_per_answer_type": _grouped(answer_types, exact),
        "top5_accuracy": official_accuracy(top5),
    }
    metrics.update(_class_metrics(majority, preds, labels))
    if labels is None:
        metrics["num_classes"] = len(set(majority) | set(preds))
    else:
        label_set = set(labels)
        metrics["num_classes"] = len(label_set)
        metrics["majority_outside_labels"] = official_accuracy([float(m not in label_set) for m in majority])
    return metrics


def write_predictions_csv(records: list[PredictionRecord], per_question_acc: list[float], path: str | Path) -> Path:
    """Write one row per question with the columns of :data:`CSV_COLUMNS`.

    ``score`` is the score of the prediction in ``top_k`` (empty when it is not there), ``majority_answer``
    is normalised, ``vqa_accuracy`` is in [0, 1] and ``top5`` reads ``"ans:score|ans:score"`` (best first).
    """
    if len(per_question_acc) != len(records):
        raise ValueError(
            f"write_predictions_csv: {len(per_question_acc)} accuracies for {len(records)} records; pass one per record"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r, acc in zip(records, per_question_acc):
            score = next((s for a, s in r.top_k if a == r.prediction), None)
            ranked = sorted(r.top_k, key=lambda item: -item[1])[:5]
            writer.writerow(
                [
                    r.question_id,
                    r.image_id,
                    r.question,
                    r.prediction,
                    "" if score is None else f"{score:.4f}",
                    majority_answer(r.answers) if r.answers else "",
                    round(acc, 4),
                    r.answer_type,
                    r.question_type,
                    "|".join(f"{a}:{s:.4f}" for a, s in ranked),
                ]
            )
    return path


def failure_summary(records: list[PredictionRecord], n: int = 20) -> dict:
    """Where the model goes wrong: frequent confusions, most-missed answers and the worst question types.

    Returns a JSON-serialisable dict with ``num_questions``, ``num_wrong`` (normalised prediction differs from
    the majority answer), ``top_confusions`` (``answer`` -> ``prediction`` pairs by count), ``most_missed_answers``
    (majority answers by number of wrong predictions) and ``worst_question_types`` (lowest official accuracy
    first); each list holds at most ``n`` entries.
    """
    if n < 1:
        raise ValueError(f"failure_summary: n={n} must be >= 1")
    accs = per_question_accuracy(records)
    confusions: Counter[tuple[str, str]] = Counter()
    support: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    by_type: dict[str, list[float]] = defaultdict(list)
    for r, acc in zip(records, accs):
        target, pred = majority_answer(r.answers), normalize_answer(r.prediction)
        support[target] += 1
        if pred != target:
            confusions[(target, pred)] += 1
            missed[target] += 1
        by_type[r.question_type].append(acc)
    top = sorted(confusions.items(), key=lambda item: (-item[1], item[0]))[:n]
    worst_answers = sorted(missed.items(), key=lambda item: (-item[1], item[0]))[:n]
    types = sorted(((official_accuracy(v), -len(v), k) for k, v in by_type.items()))[:n]
    return {
        "num_questions": len(records),
        "num_wrong": sum(confusions.values()),
        "top_confusions": [{"answer": a, "prediction": p, "count": c} for (a, p), c in top],
        "most_missed_answers": [
            {"answer": a, "num_wrong": c, "num_questions": support[a]} for a, c in worst_answers
        ],
        "worst_question_types": [
            {"question_type": k, "num_questions": -neg, "vqa_accuracy": acc} for acc, neg, k in types
        ],
    }
