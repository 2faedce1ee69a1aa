"""Per-question answer latency of the vision-prefixed LLM for 1, 5 and 20 questions per image, with and without
reuse of the visual prefix's key/value cache; writes benchmarks/results/llm_kv_cache.json.

    python benchmarks/llm_kv_cache.py                       # packaged SmolLM2-135M-Instruct, untrained projector
    python benchmarks/llm_kv_cache.py --checkpoint runs/easy-vqa-llm-stage2/checkpoint

Modes, each timed end to end from the image file (decode + resize, vision tower, LM) and divided by the number
of questions:
- ``no_reuse``: every question on its own, from scratch (vision tower and the LM over the visual prefix again).
- ``reuse_sequential``: vision tower and prefix cache once per image; the questions one after another, each
  on a copy of the cache.
- ``reuse_batched``: vision tower and prefix cache once; all questions decoded together on the cache expanded
  to the batch (what the predictor and the REST service do).
- ``batched_no_reuse``: all questions decoded together too, but each row recomputes the vision tower and its
  own prefix in the same LM pass: the speedup of ``reuse_batched`` over this one is the reuse alone, without
  the gain from batching.
Latency depends on the length of the answers generated; an untrained projector's answers run to
``max_new_tokens``, so the default run caps it at 3 tokens (easy-VQA answers are 1-2 tokens + <eos>).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import time_ms  # noqa: E402

QUESTIONS = ["what is the color of the shape?", "what shape is in the image?", "is there a red shape?",
             "does the image contain a circle?", "is there a blue triangle?", "what color is the background?",
             "is the shape green?", "which shape is present?", "is there not a rectangle?", "is there a circle?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an llm_prefix checkpoint (default: packaged SmolLM2 + new projector)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="default: the checkpoint's own setting; 3 for the untrained projector")
    parser.add_argument("--images", type=int, default=4, help="images per setting (after one warm-up image)")
    parser.add_argument("--counts", default="1,5,20")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/llm_kv_cache.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vqakit.data.sources import easy_vqa_data_dir
    from vqakit.models.llm_prefix import LLMPrefixConfig, LLMPrefixForQuestionAnswering

    if args.checkpoint:
        model = LLMPrefixForQuestionAnswering.from_pretrained(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = LLMPrefixForQuestionAnswering.build(LLMPrefixConfig())
    if args.max_new_tokens is not None or not args.checkpoint:
        model.config.max_new_tokens = args.max_new_tokens or 3
    model.eval()
    images = [str(easy_vqa_data_dir() / "test" / "images" / f"{i}.png") for i in range(args.images + 1)]
    p = model.processor
    modes = {"no_reuse": dict(reuse_cache=False), "reuse_sequential": dict(reuse_cache=True, batch_questions=False),
             "reuse_batched": dict(reuse_cache=True, batch_questions=True), "batched_no_reuse": None}
    results = {}
    with torch.inference_mode():
        for n in [int(c) for c in args.counts.split(",")]:
            qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
            results[n] = {}
            answers = {}
            for mode, kwargs in modes.items():
                run = ((lambda image: model.answer_image(p, image, qs, **kwargs)) if kwargs is not None else
                       (lambda image: [a for (a,) in model.answer_images(p, p.images([image] * n), [[q] for q in qs])]))
                run(images[0])  # warm-up
                per_question = []
                for image in images[1:]:
                    out, ms = time_ms(run, image)
                    per_question.append(ms / n)
                answers[mode] = [a for a, _ in out]
                results[n][mode] = {"per_question_ms_p50": round(statistics.median(per_question), 2),
                                    "per_question_ms_mean": round(statistics.fmean(per_question), 2)}
            base = results[n]["no_reuse"]["per_question_ms_p50"]
            for mode in ("reuse_sequential", "reuse_batched", "batched_no_reuse"):
                results[n][mode]["speedup_vs_no_reuse"] = round(base / results[n][mode]["per_question_ms_p50"], 2)
            results[n]["reuse_batched"]["speedup_vs_batched_no_reuse"] = round(
                results[n]["batched_no_reuse"]["per_question_ms_p50"] / results[n]["reuse_batched"]["per_question_ms_p50"], 2)
            results[n]["same_answers"] = len({tuple(a) for a in answers.values()}) == 1
            print(n, json.dumps(results[n]), flush=True)
    report = {
        "model": args.checkpoint or "smollm2-135m-instruct (packaged GGUF, dequantised to fp32) + untrained projector",
        "visual_tokens": model.config.num_visual_tokens, "prefix_tokens": int(model.prefix_ids.shape[1]),
        "max_new_tokens": model.config.max_new_tokens, "images_per_setting": args.images,
        "results_by_questions_per_image": results,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "load_average_at_end": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
