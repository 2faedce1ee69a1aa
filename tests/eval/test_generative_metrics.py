"""Generative metrics on hand-checkable cases (vqakit.eval.generative)."""

from __future__ import annotations

import pytest

from vqakit.eval.generative import (
    AnswerEmbedder,
    best_token_f1,
    compute_generative_metrics,
    corpus_bleu,
    generative_vqa_accuracy,
    lenient_vqa_accuracy,
    token_f1,
)


def test_official_accuracy_on_normalised_generation():
    # unanimous humans are compared verbatim by the official evaluator: the generation is normalised first
    assert generative_vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert generative_vqa_accuracy("The circle", ["circle"] * 10) == 1.0
    # 3 of 10 humans said "2": leave-one-out gives (7 * 1 + 3 * 2/3) / 10 = 0.9
    assert generative_vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert generative_vqa_accuracy("red circle", ["circle"] * 10) == 0.0


def test_lenient_accuracy_reads_first_line_and_prefix():
    assert lenient_vqa_accuracy("Answer: Red.\nIt is red because...", ["red"] * 10) == 1.0
    assert generative_vqa_accuracy("Answer: Red.\nIt is red because...", ["red"] * 10) == 0.0
    assert lenient_vqa_accuracy("the answer is blue", ["Blue"] * 10) == 1.0


def test_token_f1_by_hand():
    assert token_f1("red circle", "circle") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert best_token_f1("Red Circle", ["triangle", "circle", "circle"]) == pytest.approx(2 / 3)


def test_bleu():
    assert corpus_bleu(["red circle"], ["red circle"])[0] == 100.0
    assert corpus_bleu(["blue"], ["red"])[0] == 0.0
    score, signature = corpus_bleu(["red square"], ["red circle"])
    assert 0 < score < 100 and "eff:yes" in signature


def test_compute_generative_metrics_per_type():
    preds = ["Yes.", "blue", "red circle", "two"]
    answers = [["yes"] * 10, ["red"] * 10, ["circle"] * 10, ["2"] * 10]
    types = ["yes/no", "other", "other", "number"]
    m = compute_generative_metrics(preds, answers, types)
    assert m["vqa_accuracy"] == 50.0 and m["exact_match"] == 50.0
    assert m["token_f1"] == round(100 * (1 + 0 + 2 / 3 + 1) / 4, 2)
    assert m["per_answer_type"]["other"]["vqa_accuracy"] == 0.0
    assert m["per_answer_type"]["other"]["token_f1"] == round(100 * (2 / 3) / 2, 2)
    assert m["per_answer_type"]["number"]["num_questions"] == 1
    assert "bertscore_f1" not in m  # no embedder given
    assert m["per_question"]["exact_match"] == [1.0, 0.0, 0.0, 1.0]


def test_compute_generative_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="no predictions"):
        compute_generative_metrics([], [], [])
    with pytest.raises(ValueError, match="one of each"):
        compute_generative_metrics(["yes"], [["yes"], ["no"]], ["yes/no"])
    with pytest.raises(ValueError, match="question 0"):
        compute_generative_metrics(["yes"], [[]], ["yes/no"])


def test_bertscore_and_cosine_with_packaged_minilm():
    embedder = AnswerEmbedder()
    f1 = embedder.bertscore_f1(["red", "red", ""], ["red", "blue", "red"])
    assert f1[0] == pytest.approx(1.0, abs=1e-5) and 0 < f1[1] < 0.95 and f1[2] == 0.0
    # scores stay with their pairs (a batch of several lengths, the mismatch last)
    f1 = embedder.bertscore_f1(["yes", "no", "rectangle", "triangle", "blue"], ["yes", "no", "rectangle", "green", "blue"])
    assert f1[3] < 0.9 and all(f == pytest.approx(1.0, abs=1e-5) for i, f in enumerate(f1) if i != 3)
    cos = embedder.cosine(["circle", "circle"], ["circle", "yellow"])
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and cos[1] < cos[0]
    m = compute_generative_metrics(["circle"], [["circle"] * 10], ["other"], embedder=embedder)
    assert m["bertscore_f1"] == 100.0 and m["bertscore_layer"] == 6 and "MiniLM" in m["bertscore_model"]
