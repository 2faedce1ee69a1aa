"""Official results files and `vqakit score`: Python 2 rounding, hand-computed scores, agreement with `evaluate`,
bad results files, a split without annotations."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from decimal import Decimal

import pytest

from vqakit.cli import main
from vqakit.data.config import DataConfig
from fixtures.vqa_v2 import write_vqa_v2_fixture
from vqakit.data.sources import vqa_v2_paths
from vqakit.eval.score import check_results, score_answers, score_results
from vqakit.eval.vqa_accuracy import official_accuracy, py2_round


# ----------------------------------------------------------------------------- rounding


def test_py2_round_takes_exact_halves_away_from_zero():
    assert py2_round(53.125) == 53.13 and round(53.125, 2) == 53.12  # 53.125 is a double exactly: a true half
    assert py2_round(0.125) == 0.13 and py2_round(-0.125) == -0.13 and py2_round(0.375) == 0.38
    assert py2_round(2.675) == 2.67  # the double is 2.67499999...: below the half, as in Python 2
    assert py2_round(1.005) == 1.0  # 1.00499999999999989...
    assert py2_round(100.0) == 100.0 and py2_round(0.0) == 0.0


def test_py2_round_equals_python3_round_off_the_halves():
    rng = random.Random(0)
    for _ in range(5000):
        x = rng.uniform(0, 100)
        if (Decimal(x) * 100) % 1 != Decimal("0.5"):
            assert py2_round(x) == round(x, 2)


def test_official_accuracy_reports_a_mean_of_53_125_as_53_13():
    values = [1.0] * 17 + [0.0] * 15
    assert 100 * float(sum(values)) / len(values) == 53.125
    assert official_accuracy(values) == 53.13


# ----------------------------------------------------------------------------- hand-computed scores


def _write_official(root, anns: list[dict]) -> tuple:
    """Official-layout questions + annotations files holding ``anns`` (id, answers, types)."""
    questions = [{"image_id": a["image_id"], "question": f"q{a['question_id']}?", "question_id": a["question_id"]}
                 for a in anns]
    def human(answers):
        return [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(answers)]

    full = [{**a, "multiple_choice_answer": a["answers"][0], "answers": human(a["answers"])} for a in anns]
    root.mkdir(parents=True, exist_ok=True)
    q, a = root / "questions.json", root / "annotations.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": full}))
    return q, a


def _ann(qid, answers, answer_type="other", question_type="what"):
    return {"question_id": qid, "image_id": qid // 10, "answers": answers, "answer_type": answer_type,
            "question_type": question_type}


def test_score_matches_hand_computed_values(tmp_path):
    q, a = _write_official(tmp_path, [
        _ann(10, ["2"] * 3 + ["3"] * 7, "number", "how many"),  # "two" -> "2": 3 matches -> 0.9 (normalised)
        _ann(20, ["yes"] * 10, "yes/no", "is the"),  # unanimous: "Yes" is compared verbatim -> 0
        _ann(30, ["red"] * 2 + ["blue"] * 8, "other", "what color is the"),  # 2 matches -> (8*2/3+2*1/3)/10 = 0.6
    ])  # fmt: skip
    r = tmp_path / "results.json"
    r.write_text(json.dumps([{"question_id": 30, "answer": "Red."}, {"question_id": 10, "answer": "two"},
                             {"question_id": 20, "answer": "Yes"}]))
    s = score_results(q, a, r)
    assert s["overall"] == 50.0  # round(100 * 1.5 / 3, 2)
    assert s["perAnswerType"] == {"number": 90.0, "other": 60.0, "yes/no": 0.0}
    assert s["perQuestionType"] == {"how many": 90.0, "is the": 0.0, "what color is the": 60.0}
    assert s["evalQA"] == {10: 90.0, 20: 0.0, 30: 60.0}
    assert s["evalAnsType"]["number"] == {10: 90.0} and s["num_questions"] == 3


def test_score_rounds_53_125_up_like_the_python2_evaluator(tmp_path):
    anns = [_ann(100 + i, ["cat"] * 10, "other") for i in range(32)]
    q, a = _write_official(tmp_path, anns)
    r = tmp_path / "results.json"
    r.write_text(json.dumps([{"question_id": x["question_id"], "answer": "cat" if i < 17 else "dog"}
                             for i, x in enumerate(anns)]))
    assert score_results(q, a, r)["overall"] == 53.13


def test_score_reads_gzipped_files(tmp_path):
    q, a = _write_official(tmp_path, [_ann(10, ["2"] * 3 + ["3"] * 7, "number")])
    for p in (q, a):
        p.with_suffix(".json.gz").write_bytes(gzip.compress(p.read_bytes()))
    r = tmp_path / "results.json.gz"
    r.write_bytes(gzip.compress(json.dumps([{"question_id": 10, "answer": "2"}]).encode()))
    assert score_results(q.with_suffix(".json.gz"), a.with_suffix(".json.gz"), r)["overall"] == 90.0


def test_score_answers_visits_annotation_order():
    anns = {i: {"answers": ["a"] * 5 + ["b"] * 5, "answer_type": "other", "question_type": "t"} for i in (3, 1, 2)}
    s = score_answers({1: "a", 2: "b", 3: "c"}, anns)
    assert list(s["evalQA"]) == [3, 1, 2] and s["overall"] == 66.67


# ----------------------------------------------------------------------------- bad results files


@pytest.mark.parametrize("results, message", [
    ({"question_id": 1, "answer": "yes"}, "a results file is a JSON list"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}, {"question_id": 99, "answer": "x"},
      {"question_id": 98, "answer": "x"}], r"2 question ids not in the annotations: \[99, 98\]"),
    ([{"question_id": 1, "answer": "yes"}], r"2 questions have no result: \[2, 3\]"),
    ([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}, {"question_id": 2, "answer": "no"},
      {"question_id": 3, "answer": "no"}], r"1 question ids appear more than once: \[1\]"),
    ([{"question_id": 1, "answer": 2}, {"question_id": 2, "answer": None}, {"question_id": 3, "answer": "no"}],
     r"2 non-string answers \(question ids \[1, 2\]\)"),
    ([{"question_id": "1", "answer": "yes"}, {"question_id": 2, "answer": "no"}, {"question_id": 3, "answer": "no"}],
     r"1 question ids are not integers: \['1'\]"),
    ([{"question_id": 1}, {"question_id": 2, "answer": "no"}, {"question_id": 3, "answer": "no"}],
     r"1 entries are not \{\"question_id\", \"answer\"\} objects \(entries \[0\]"),
])  # fmt: skip
def test_bad_results_files_are_rejected_naming_the_ids(tmp_path, results, message):
    q, a = _write_official(tmp_path, [_ann(i, ["yes"] * 10, "yes/no") for i in (1, 2, 3)])
    r = tmp_path / "results.json"
    r.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=message):
        score_results(q, a, r)


def test_check_results_lists_every_problem_and_the_first_few_ids():
    results = [{"question_id": i, "answer": "x"} for i in range(100, 110)]
    first_five = r"\[100, 101, 102, 103, 104, \.\.\. \(\+5 more\)\]"
    with pytest.raises(ValueError, match=rf"nothing was scored: 10 question ids not in the annotations: {first_five}; "
                                         r"1 questions have no result"):
        check_results(results, [1])


def test_results_that_are_not_json_name_the_file(tmp_path):
    q, a = _write_official(tmp_path, [_ann(1, ["yes"] * 10, "yes/no")])
    r = tmp_path / "results.json"
    r.write_text("[{")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        score_results(q, a, r)


# ----------------------------------------------------------------------------- evaluate -> results.json -> score


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    dst = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_score_of_evaluates_results_equals_its_metrics(checkpoint, tmp_path, capsys):
    from vqakit.eval.evaluate import evaluate_checkpoint

    root = write_vqa_v2_fixture(tmp_path / "vqa", "val", num_images=6, questions_per_image=4, seed=3)
    data = DataConfig(dataset="vqa-v2", root=str(root), cache_dir=str(tmp_path / "cache"))
    metrics = evaluate_checkpoint(checkpoint, data, split="val", progress=False)
    out = checkpoint / "eval-vqa-v2-val"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "predictions.csv", "failures.json", "results.json"}
    results = json.loads((out / "results.json").read_text())
    assert len(results) == metrics["num_questions"] == 24
    assert all(isinstance(r["question_id"], int) and isinstance(r["answer"], str) for r in results)

    q, a, _ = vqa_v2_paths(root, "val")
    main(["score", "--questions", str(q), "--annotations", str(a), "--results", str(out / "results.json"),
          "--out", str(tmp_path / "scores.json")])
    printed = capsys.readouterr().out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["overall"] == metrics["vqa_accuracy"]
    assert scores["perAnswerType"] == metrics["per_answer_type"]
    assert scores["perQuestionType"] == metrics["per_question_type"]
    assert len(scores["evalQA"]) == 24 and f'"overall": {metrics["vqa_accuracy"]}' in printed
    assert "vqa_accuracy" in (checkpoint / "README.md").read_text()  # evaluate refreshed the model card


def test_split_without_annotations_writes_only_results_json(checkpoint, tmp_path, capsys):
    root = write_vqa_v2_fixture(tmp_path / "vqa", "test-dev", num_images=3, questions_per_image=2)
    assert not vqa_v2_paths(root, "test-dev")[1].exists()  # like the official download: questions only
    main(["evaluate", "--checkpoint", str(checkpoint), "--data.dataset", "vqa-v2", "--data.root", str(root),
          "--split", "test-dev", "--data.cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "has no annotations: wrote only the official results file" in out and "(6 answers)" in out
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["results.json"]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    questions = json.loads(vqa_v2_paths(root, "test-dev")[0].read_text())["questions"]
    assert [r["question_id"] for r in results] == [x["question_id"] for x in questions]


def test_score_cli_bad_results_is_a_one_line_error(tmp_path, capsys):
    q, a = _write_official(tmp_path, [_ann(1, ["yes"] * 10, "yes/no"), _ann(2, ["no"] * 10, "yes/no")])
    r = tmp_path / "results.json"
    r.write_text(json.dumps([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "yes"}]))
    with pytest.raises(SystemExit) as exc:
        main(["score", "--questions", str(q), "--annotations", str(a), "--results", str(r)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "appear more than once: [1]" in err and "questions have no result: [2]" in err
