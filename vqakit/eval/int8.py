"""Does INT8 keep this checkpoint's accuracy? Answer held-out questions with the float32 and the INT8 ONNX
exports, score both with the official VQA accuracy, and record the verdict next to the INT8 export
(``<checkpoint>/onnx/int8/accuracy.json``).

``VQAPredictor.from_pretrained(quantize="auto")``, the default, serves INT8 only where this check says it keeps
accuracy: INT8 is ~2x faster on the CPU (benchmarks/README.md), and a model whose answers it moves keeps float32.
Training runs the check at its end on the validation questions it carved from train; ``vqakit export
--verify_int8`` runs it for any checkpoint on a split of a dataset.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from pathlib import Path

from vqakit.eval.vqa_accuracy import official_accuracy, vqa_accuracy

logger = logging.getLogger("vqakit")

MAX_DROP = 0.2  # official accuracy points INT8 may lose against float32 and still be served by default
LIMIT = 2000  # held-out questions answered by each of the two models


def verify_int8(checkpoint_dir: str | Path, examples: list, max_drop: float = MAX_DROP, limit: int | None = LIMIT,
                seed: int = 0, images_per_batch: int = 32) -> dict:
    """Answer up to ``limit`` of ``examples`` (a seeded sample; questions with human answers) with the float32
    and the INT8 ONNX exports (made first where missing) and write the verdict: ``keeps_accuracy`` when INT8's
    official accuracy is at most ``max_drop`` points below float32's. Returns the record written."""
    from vqakit.inference.export import write_int8_verdict
    from vqakit.inference.predict import VQAPredictor

    checkpoint_dir = Path(checkpoint_dir)
    examples = [e for e in examples if e.answers]
    if not examples:
        raise ValueError(f"verify_int8({checkpoint_dir}): no question with human answers to check INT8 on")
    if limit is not None and len(examples) > limit:
        examples = random.Random(seed).sample(examples, limit)
    answers, seconds = {}, {}
    for name, quantize in (("float32", None), ("int8", "int8")):
        predictor = VQAPredictor.from_pretrained(checkpoint_dir, device="cpu", backend="onnx", quantize=quantize)
        start = time.perf_counter()
        answers[name] = _answer(predictor, examples, images_per_batch)
        seconds[name] = round(time.perf_counter() - start, 2)
    scores = {name: official_accuracy([vqa_accuracy(a, e.answers) for a, e in zip(got, examples)])
              for name, got in answers.items()}
    changed = sum(a != b for a, b in zip(answers["float32"], answers["int8"]))
    drop = round(scores["float32"] - scores["int8"], 2)
    record = {"questions": len(examples), "float32_accuracy": scores["float32"], "int8_accuracy": scores["int8"],
              "drop": drop, "max_drop": max_drop, "keeps_accuracy": drop <= max_drop, "answers_changed": changed,
              "seconds": seconds, "backend": "onnx"}
    write_int8_verdict(checkpoint_dir, record)
    logger.info("INT8 check of %s on %d questions: accuracy %.2f -> %.2f (answers changed: %d): %s",
                checkpoint_dir, len(examples), scores["float32"], scores["int8"], changed,
                "INT8 is served by default" if record["keeps_accuracy"] else
                f"INT8 loses more than {max_drop} points, float32 is served by default")
    return record


def _answer(predictor, examples: list, images_per_batch: int) -> list[str]:
    """The predictor's answer to every example, asked as the server asks: each image once with its questions."""
    by_image = defaultdict(list)
    for i, e in enumerate(examples):
        by_image[e.image].append(i)
    images = list(by_image)
    out = [""] * len(examples)
    for start in range(0, len(images), images_per_batch):
        chunk = images[start : start + images_per_batch]
        got = predictor.predict_batch(chunk, [[examples[i].question for i in by_image[im]] for im in chunk], top_k=1)
        for im, preds in zip(chunk, got):
            for i, p in zip(by_image[im], preds):
                out[i] = p.answer
    return out
