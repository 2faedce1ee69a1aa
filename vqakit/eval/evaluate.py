"""Evaluate a checkpoint directory on a split: ``metrics.json``, ``predictions.csv``, ``failures.json`` and the
official results file ``results.json`` (``[{"question_id", "answer"}]``, what EvalAI takes). A split without
annotations (VQA v2 test-dev / test) gets ``results.json`` only.

Uses only inference code (``VQAPredictor``), so it runs on any checkpoint, with no training imports.
Answers are journaled as they come (``vqakit.eval.journal``), so a killed evaluation resumes where it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from vqakit.data.config import DataConfig, load_split
from vqakit.data.images import filter_examples, scan_images
from vqakit.eval.journal import PredictionJournal, journal_key
from vqakit.eval.metrics import (
    PredictionRecord,
    compute_metrics,
    failure_summary,
    per_question_accuracy,
    write_predictions_csv,
)
from vqakit.eval.score import write_results_json
from vqakit.inference.predict import Prediction, VQAPredictor

JOURNAL_EVERY = 2048  # questions answered between two fsyncs of the predictions journal


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: DataConfig,
    split: str | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    use_cache: bool = True,
    progress: bool = True,
    predictor: VQAPredictor | None = None,
    resume: bool = True,
    journal_every: int = JOURNAL_EVERY,
    per_image: bool = False,
) -> dict:
    """Predict every question of ``split`` (default ``data.eval_split``) and score it.

    Writes ``metrics.json``, ``predictions.csv``, ``failures.json`` and ``results.json`` into ``out_dir``
    (default: ``<checkpoint>/eval-<dataset>-<split>``) and returns the metrics. When no question of the split has
    human answers (VQA v2 ``test-dev2015`` / ``test2015``), only ``results.json`` is written and the returned
    dict has ``annotated: False``. The checkpoint's model card (``README.md``) is refreshed with the metrics.
    Answers are appended to ``<out_dir>/predictions.partial.jsonl`` every ``journal_every`` questions (rounded up
    to whole batches, so batches are the same as in an uninterrupted run); with ``resume``, a rerun after a kill
    answers only the questions not in it, and scores the same as an uninterrupted run.

    ``per_image``: answer each image's questions in one ``predictor.predict(image, questions)`` call, as
    ``VQAPredictor.predict`` and ``vqakit serve`` do, instead of batches of ``batch_size`` questions from many
    images. Answers can depend on what shares a pass: dynamic INT8 quantizes activations with one scale per call,
    so a padded batch of 64 questions answers differently from a served request (see benchmarks/README.md).
    """
    split = split or data.eval_split
    if predictor is None:
        from vqakit.inference.generative import load_predictor  # a classifier or a generative checkpoint, by config.json

        predictor = load_predictor(checkpoint, quantize=None)  # the model as trained; INT8 when asked for
    generative = getattr(predictor, "generative", False)
    examples, skipped = load_examples(data, split, progress)
    out = Path(out_dir) if out_dir is not None else Path(checkpoint) / f"eval-{data.dataset}-{split}"
    key = journal_key(checkpoint, data.dataset, split, [e.question_id for e in examples], use_cache=use_cache,
                      quantize=getattr(predictor, "quantize", None), backend=getattr(predictor, "backend", None),
                      decoding=getattr(predictor, "decoding", None), predictor=type(predictor).__name__,
                      **({"per_image": True} if per_image else {}))
    journal = PredictionJournal(out, key, resume=resume)
    todo = [i for i in range(len(examples)) if i not in journal.done]  # rows of ``examples``
    resumed = len(examples) - len(todo)
    start = time.perf_counter()
    if per_image:
        chunks = _image_chunks(todo, examples, journal_every)
    else:
        chunk = -(-max(1, journal_every) // batch_size) * batch_size
        chunks = ([todo[b : b + chunk]] for b in range(0, len(todo), chunk))
    for groups in chunks:  # per_image: one list of rows per image; else one batch-aligned list of rows
        rows = [i for group in groups for i in group]
        if per_image:
            answers = [p for group in tqdm(groups, desc="answering per image", disable=not progress)
                       for p in predictor.predict(examples[group[0]].image, [examples[i].question for i in group])]
        else:
            answers = predictor.predict_examples([examples[i] for i in rows], batch_size=batch_size,
                                                 use_cache=use_cache, cache_dir=_features_dir(data), progress=progress)
        journal.append([{"row": i, "question_id": examples[i].question_id, "answer": p.answer,
                         "score": float(p.score), "top_k": [[a, float(s)] for a, s in p.top_k]}
                        for i, p in zip(rows, answers)])
    seconds = time.perf_counter() - start
    predictions = [_prediction(e, journal.done[i]) for i, e in enumerate(examples)]
    metrics = score_and_write(
        examples, predictions, out, labels=predictor.labels, generative=generative,
        decoding=predictor.decoding if generative else None,
        info=dict(dataset=data.dataset, split=split, checkpoint=str(checkpoint), skipped_images=skipped,
                  predict_seconds=round(seconds, 2), questions_per_second=round(len(todo) / max(seconds, 1e-9), 1),
                  resumed_questions=resumed),
    )  # fmt: skip
    journal.remove()
    return metrics


def _image_chunks(todo: list[int], examples: list, journal_every: int):
    """``per_image``: each image's rows (in the split's order of first appearance), gathered into chunks of at
    least ``journal_every`` rows between journal writes; an image is never cut between two chunks."""
    groups: dict[str, list[int]] = {}
    for i in todo:
        image = examples[i].image
        if not isinstance(image, (str, Path)):
            raise ValueError(f"per_image: question {examples[i].question_id} has {len(image)} images; answering "
                             f"per image needs one image per question")
        groups.setdefault(str(image), []).append(i)
    chunk, n = [], 0
    for group in groups.values():
        chunk.append(group)
        n += len(group)
        if n >= journal_every:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def load_examples(data: DataConfig, split: str, progress: bool = True) -> tuple[list, list]:
    """The examples of ``split`` with unreadable images left out (``data.scan_images``), and those images' ids."""
    examples = load_split(data, split)
    if data.scan_images:
        report = scan_images({e.image_id: e.image for e in examples}, progress=progress)
        examples = filter_examples(examples, report)
        skipped = [b[0] for b in report.bad]
    else:
        skipped = []
    if not examples:
        raise ValueError(f"no examples to evaluate in {data.dataset} split {split!r}")
    return examples, skipped


def score_and_write(examples: list, predictions: list, out: Path, labels: list[str] | None, generative: bool,
                    decoding: dict | None, info: dict) -> dict:
    """Score ``predictions`` (one ``Prediction`` per example, raw answers) as the official evaluation does and write
    ``metrics.json`` (with ``info``), ``predictions.csv``, ``failures.json`` and the official ``results.json`` into
    ``out``; the metrics. A split without human answers gets ``results.json`` only (``annotated: False``).

    Shared by ``evaluate_checkpoint`` and ``vqakit.eval.endpoint.evaluate_endpoint``, so a checkpoint and the same
    checkpoint behind a server are scored by one code path."""
    if generative:  # free text is scored after the official normalisation (see vqakit.eval.generative)
        from vqakit.eval.generative import normalize_generation

        predictions = [replace(p, answer=normalize_generation(p.answer)) for p in predictions]
    out = Path(out)
    results_path = write_results_json([e.question_id for e in examples], [p.answer for p in predictions],
                                      out / "results.json")
    unanswered = [e.question_id for e in examples if not e.answers]
    if unanswered:
        if len(unanswered) < len(examples):
            raise ValueError(f"{info.get('dataset')} split {info.get('split')!r}: {len(unanswered)} of "
                             f"{len(examples)} questions have no human answers (question ids "
                             f"{sorted(unanswered)[:5]}); a split is scored whole or not at all. Wrote only "
                             f"{results_path}")
        return {"annotated": False, "num_questions": len(examples), **info, "results_file": str(results_path),
                "out_dir": str(out)}
    records = [
        PredictionRecord(
            question_id=e.question_id, question=e.question, image_id=e.image_id, prediction=p.answer,
            top_k=p.top_k, answers=e.answers, answer_type=e.answer_type, question_type=e.question_type,
        )
        for e, p in zip(examples, predictions)
    ]  # fmt: skip
    metrics = compute_metrics(records, labels=labels)
    if generative:
        from vqakit.eval.generative import AnswerEmbedder, compute_generative_metrics

        gen = compute_generative_metrics([p.answer for p in predictions], [e.answers for e in examples],
                                         [e.answer_type for e in examples], embedder=AnswerEmbedder())
        gen.pop("per_question")
        metrics["generative"] = gen
        metrics["decoding"] = decoding
    metrics.update(info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions_csv(records, per_question_accuracy(records), out / "predictions.csv")
    (out / "failures.json").write_text(json.dumps(failure_summary(records), indent=2) + "\n")
    metrics["out_dir"] = str(out)
    metrics["results_file"] = str(results_path)
    checkpoint = info.get("checkpoint")
    if checkpoint and (Path(checkpoint) / "config.json").is_file():  # a local checkpoint: refresh its model card
        from vqakit.inference.model_card import refresh_model_card

        refresh_model_card(checkpoint, metrics)
    return metrics


def _prediction(example, row: dict) -> Prediction:
    return Prediction(example.question, row["answer"], row["score"], [tuple(t) for t in row["top_k"]])


def _features_dir(data: DataConfig):
    return None if data.cache_dir is None else Path(data.cache_dir) / "features"


def format_metrics(metrics: dict) -> str:
    """A plain-text table of the headline numbers (a note on the results file for a split without answers)."""
    if metrics.get("annotated") is False:
        return (f"{metrics['dataset']} split {metrics['split']!r} has no annotations: wrote only the official results "
                f"file {metrics['results_file']} ({metrics['num_questions']} answers), to submit to the evaluation "
                f"server (EvalAI) or score with `vqakit score`")
    rows = [
        ("questions", f"{metrics['num_questions']}"),
        ("VQA accuracy (official)", f"{metrics['vqa_accuracy']:.2f}"),
        *[(f"  {t}", f"{v:.2f}") for t, v in sorted(metrics["per_answer_type"].items())],
        ("exact match", f"{metrics['exact_match']:.2f}"),
        ("top-5 accuracy", f"{metrics['top5_accuracy']:.2f}"),
        ("precision (macro)", f"{metrics['precision_macro']:.2f}"),
        ("recall (macro)", f"{metrics['recall_macro']:.2f}"),
        ("F1 (macro)", f"{metrics['f1_macro']:.2f}"),
        ("F1 (weighted)", f"{metrics['f1_weighted']:.2f}"),
    ]
    if "generative" in metrics:  # free-text answers
        g = metrics["generative"]
        rows += [(name, f"{g[key]:.2f}") for name, key in (
            ("VQA accuracy (lenient)", "vqa_accuracy_lenient"), ("token F1", "token_f1"), ("BLEU", "bleu"),
            ("BERTScore F1 (MiniLM-L6)", "bertscore_f1"), ("answer embedding cosine", "embedding_cosine")) if key in g]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)
