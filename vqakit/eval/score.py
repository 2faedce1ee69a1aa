"""Official results files: write them, check them, and score any of them as the official evaluator does.

The VQA challenge (EvalAI, https://eval.ai/web/challenges/challenge-page/830) takes a results file::

    [{"question_id": 262148000, "answer": "two"}, ...]    # one entry per question of the split

``score_results`` reproduces ``VQAEval.evaluate`` + ``setAccuracy`` + ``setEvalQA`` of
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (https://github.com/GT-Vision-Lab/VQA, master):

- each question's accuracy is :func:`vqakit.eval.vqa_accuracy.vqa_accuracy` (the leave-one-out mean of
  ``min(1, matches / 3)`` after the evaluator's own answer processing);
- questions are visited in annotation-file order (``VQA.getQuesIds()``), so every float sum is the same;
- ``overall`` / ``perQuestionType`` / ``perAnswerType`` are ``round(100 * sum / n, 2)`` and ``evalQA`` values
  ``round(100 * acc, 2)`` with Python 2's rounding (:func:`vqakit.eval.vqa_accuracy.py2_round`): the script is
  Python 2, whose ``round`` takes halves away from zero.

The output has the evaluator's shape (its ``accuracy`` dict plus its per-question dicts)::

    {"overall": 63.33, "perQuestionType": {"how many": 50.0, ...}, "perAnswerType": {"yes/no": 100.0, ...},
     "evalQA": {"262148000": 100.0, ...}, "evalQuesType": {...}, "evalAnsType": {...}}

Where the official ``VQA.loadRes`` only asserts that the id sets match (and silently keeps the last of duplicated
ids), :func:`check_results` rejects a file with unknown, missing or duplicated ids or non-string answers, naming
the first few ids of each problem: nothing is scored silently.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from vqakit.eval.vqa_accuracy import py2_round, vqa_accuracy

RESULTS_FORMAT = '[{"question_id": int, "answer": str}, ...]'


def write_results_json(question_ids: list[int], answers: list[str], path: str | Path) -> Path:
    """Write a results file in the official / EvalAI format, in the given order.

    >>> import tempfile, json
    >>> p = write_results_json([1, 2], ["yes", "two"], Path(tempfile.mkdtemp()) / "results.json")
    >>> json.loads(p.read_text())
    [{'question_id': 1, 'answer': 'yes'}, {'question_id': 2, 'answer': 'two'}]
    """
    if len(question_ids) != len(answers):
        raise ValueError(f"write_results_json: {len(question_ids)} question ids for {len(answers)} answers")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": int(q), "answer": str(a)} for q, a in zip(question_ids, answers)]
    path.write_text(json.dumps(rows) + "\n", encoding="utf-8")
    return path


def _first(ids, n: int = 5) -> str:
    ids = list(ids)
    more = f", ... (+{len(ids) - n} more)" if len(ids) > n else ""
    return "[" + ", ".join(repr(i) if isinstance(i, str) else str(i) for i in ids[:n]) + more + "]"


def read_results(path: str | Path) -> list[Any]:
    """The entries of a results file (``.json`` or ``.json.gz``), checked for shape by :func:`check_results`."""
    from vqakit.data.sources import _read_json

    path = Path(path).expanduser()
    data = _read_json(path, what=f"a results list {RESULTS_FORMAT}")
    if not isinstance(data, list):
        found = f"an object with keys {list(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: a results file is a JSON list {RESULTS_FORMAT}, got {found}")
    return data


def check_results(results: list[Any], question_ids: list[int], where: str = "results") -> dict[int, str]:
    """``question_id -> answer`` of ``results``, which must answer each of ``question_ids`` exactly once.

    Raises one ``ValueError`` that lists every problem found (entries that are not ``{question_id, answer}``
    objects, non-integer ids, non-string answers, duplicated, unknown and missing ids), each with its first ids.

    >>> check_results([{"question_id": 1, "answer": "yes"}], [1])
    {1: 'yes'}
    >>> check_results([{"question_id": 1, "answer": 2}, {"question_id": 9, "answer": "no"}], [1, 3])
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: results: rejected, nothing was scored: 1 non-string answers (question ids [1]); 1 question ids ...
    """
    problems = []
    keys = {"question_id", "answer"}
    not_objects = [i for i, r in enumerate(results) if not isinstance(r, dict) or not keys <= set(r)]
    if not_objects:
        problems.append(f"{len(not_objects)} entries are not {{\"question_id\", \"answer\"}} objects (entries "
                        f"{_first(not_objects)}, e.g. {str(results[not_objects[0]])[:80]})")
    rows = [r for i, r in enumerate(results) if not not_objects or i not in set(not_objects)]
    def integer(q) -> bool:
        return isinstance(q, int) and not isinstance(q, bool)

    bad_ids = [r["question_id"] for r in rows if not integer(r["question_id"])]
    if bad_ids:
        problems.append(f"{len(bad_ids)} question ids are not integers: {_first(bad_ids)}")
    rows = [r for r in rows if integer(r["question_id"])]
    non_string = [r["question_id"] for r in rows if not isinstance(r["answer"], str)]
    if non_string:
        problems.append(f"{len(non_string)} non-string answers (question ids {_first(non_string)})")
    counts = Counter(r["question_id"] for r in rows)
    duplicates = [q for q, n in counts.items() if n > 1]
    if duplicates:
        problems.append(f"{len(duplicates)} question ids appear more than once: {_first(duplicates)}")
    known = set(question_ids)
    unknown = [q for q in counts if q not in known]
    if unknown:
        problems.append(f"{len(unknown)} question ids not in the annotations: {_first(unknown)}")
    missing = [q for q in question_ids if q not in counts]
    if missing:
        problems.append(f"{len(missing)} questions have no result: {_first(missing)}")
    if problems:
        raise ValueError(f"{where}: rejected, nothing was scored: " + "; ".join(problems))
    return {r["question_id"]: r["answer"] for r in rows}


def score_answers(answers: dict[int, str], annotations: dict[int, dict]) -> dict:
    """Score ``question_id -> answer`` against ``annotations`` (``question_id -> {"answers", "answer_type",
    "question_type"}``, in annotation-file order) exactly as the official evaluator does.

    >>> ann = {1: {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"}}
    >>> s = score_answers({1: "two"}, ann)
    >>> s["overall"], s["perAnswerType"], s["evalQA"]
    (90.0, {'number': 90.0}, {1: 90.0})
    """
    acc_qa: list[float] = []
    acc_ques_type: dict[str, list[float]] = defaultdict(list)
    acc_ans_type: dict[str, list[float]] = defaultdict(list)
    eval_qa: dict[int, float] = {}
    eval_ques_type: dict[str, dict[int, float]] = defaultdict(dict)
    eval_ans_type: dict[str, dict[int, float]] = defaultdict(dict)
    for qid, ann in annotations.items():  # VQA.getQuesIds(): annotation-file order
        acc = vqa_accuracy(answers[qid], ann["answers"])
        acc_qa.append(acc)
        acc_ques_type[ann["question_type"]].append(acc)
        acc_ans_type[ann["answer_type"]].append(acc)
        eval_qa[qid] = py2_round(100 * acc, 2)  # VQAEval.setEvalQA
        eval_ques_type[ann["question_type"]][qid] = eval_qa[qid]
        eval_ans_type[ann["answer_type"]][qid] = eval_qa[qid]
    if not acc_qa:
        raise ValueError("score: the annotations hold no questions")

    def mean(values: list[float]) -> float:  # VQAEval.setAccuracy, expression for expression
        return py2_round(100 * float(sum(values)) / len(values), 2)

    return {
        "overall": mean(acc_qa),
        "perQuestionType": {t: mean(v) for t, v in sorted(acc_ques_type.items())},
        "perAnswerType": {t: mean(v) for t, v in sorted(acc_ans_type.items())},
        "evalQA": eval_qa,
        "evalQuesType": {t: eval_ques_type[t] for t in sorted(eval_ques_type)},
        "evalAnsType": {t: eval_ans_type[t] for t in sorted(eval_ans_type)},
    }


def score_results(questions: str | Path, annotations: str | Path, results: str | Path) -> dict:
    """Score a results file (from any model) against official VQA v2 questions + annotations files.

    Args:
        questions: ``v2_OpenEnded_mscoco_<split>_questions.json`` (or ``.json.gz``).
        annotations: ``v2_mscoco_<split>_annotations.json`` (or ``.json.gz``); must cover the same questions.
        results: ``[{"question_id": int, "answer": str}, ...]``, one entry per question.

    Returns:
        the evaluator's ``accuracy`` (``overall``, ``perQuestionType``, ``perAnswerType``) with ``evalQA``,
        ``evalQuesType``, ``evalAnsType`` and ``num_questions``.
    """
    from vqakit.data.sources import _check_agreement, _read_vqa_v2_annotations, _read_vqa_v2_questions

    q_path, a_path, r_path = (Path(p).expanduser() for p in (questions, annotations, results))
    qs = _read_vqa_v2_questions(q_path)
    anns, image_of = _read_vqa_v2_annotations(a_path)
    _check_agreement(qs, image_of, q_path, a_path)
    answers = check_results(read_results(r_path), list(anns), where=str(r_path))
    return {**score_answers(answers, anns), "num_questions": len(anns)}
