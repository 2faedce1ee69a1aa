"""The VQA accuracy of one prediction, computed exactly as the official evaluator does.

Antol et al., 2015 (https://arxiv.org/abs/1505.00468) define ``Acc(ans) = min(#humans that said ans / 3, 1)``,
averaged over the 10 leave-one-out subsets of 9 human answers. This module reproduces ``VQAEval.evaluate`` of
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (https://github.com/GT-Vision-Lab/VQA, master) per question:

1. newlines and tabs become spaces and surrounding whitespace is stripped, on the answers and the prediction;
2. only when the (stripped) human answers are not all identical are the answers *and the prediction*
   normalised with ``processPunctuation`` + ``processDigitArticle``. A unanimous question is compared
   verbatim, so ``"Yes"`` scores 0 against ten ``"yes"`` (an upstream quirk that published numbers include);
3. for each answer position i, ``acc_i = min(1, matches among the other answers / 3)``; the question's
   accuracy is the mean of the ``acc_i``.

Older revisions of the same file (and Cloud-CV/VQA-Challenge) normalise the prediction always and the human
answers with ``processPunctuation`` only; we follow master, which LAVIS and MMF also vendor.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from vqakit.data.answers import process_digit_article, process_punctuation


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """The official VQA accuracy of ``prediction`` against the human answers, unrounded, in [0, 1].

    >>> vqa_accuracy("two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"])
    0.9
    >>> vqa_accuracy("Yes", ["yes"] * 10)  # unanimous: compared without normalisation
    0.0
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy: gt_answers is empty; a question needs at least one human answer")
    gts = [_clean(a) for a in gt_answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    n_match = sum(g == pred for g in gts)
    # Leave-one-out over answer positions: position i sees n_match - [gts[i] == pred] matches among the others.
    # Summed in position order with float division, as upstream does, so the result is bit-identical.
    accs = [min(1, float(n_match - (g == pred)) / 3) for g in gts]
    return float(sum(accs)) / len(accs)


def py2_round(x: float, ndigits: int = 2) -> float:
    """``round(x, ndigits)`` as Python 2.7 computes it, which the official evaluator (a Python 2 script) uses.

    Python 2.7's ``float.__round__`` (``_Py_double_round`` in ``Objects/floatobject.c``) rounds the *exact* binary
    value of the double to ``ndigits`` decimals, halves away from zero; Python 3 rounds halves to even. They
    differ only when the double is exactly halfway, e.g. 53.125 (= 100 * 17 / 32): Python 2 reports 53.13, Python
    3's ``round`` 53.12. ``Decimal(x)`` is the double's exact value, so a value that merely prints as a half (2.675
    is 2.67499999999999982236431605997495353221893310546875) rounds down in both.

    >>> py2_round(53.125), round(53.125, 2), py2_round(2.675), py2_round(-0.125)
    (53.13, 53.12, 2.67, -0.13)
    """
    quantum = Decimal(1).scaleb(-ndigits)  # 10 ** -ndigits, exactly
    return float(Decimal(x).quantize(quantum, rounding=ROUND_HALF_UP))  # ROUND_HALF_UP is away from zero


def official_accuracy(values: list[float]) -> float:
    """Aggregate per-question accuracies as the evaluator reports them: ``round(100 * mean, 2)`` in Python 2.

    >>> official_accuracy([1.0, 0.9, 0.0])
    63.33
    >>> official_accuracy([1.0] * 17 + [0.0] * 15)  # 53.125 exactly: the evaluator's Python 2 rounds it up
    53.13
    """
    if len(values) == 0:
        raise ValueError("official_accuracy: no per-question accuracies given")
    # Same expression and operation order as VQAEval.setAccuracy, and Python 2's rounding: equal bit for bit.
    return py2_round(100 * float(sum(values)) / len(values), 2)
