"""Answer latency of the vision-prefixed LLM on CPU, as served (``GenerativePredictor.predict(image_file,
questions)``): p50/p95 per question at 1 and 5 questions per image, float32 and dynamic INT8; writes
benchmarks/results/llm_latency.json.

    python benchmarks/llm_latency.py --checkpoint runs/easy-vqa-llm-stage2/checkpoint
    python benchmarks/llm_latency.py --checkpoint ... --threads 1 --quantize int8 --drafts on

``--drafts on,off``: with and without answer drafts (``LLMPrefixConfig.draft_answers``: the checkpoint's frequent
answers verified in the question's own LM pass, so an answer among them takes one LM pass instead of two);
``drafted_share`` is the share of timed questions answered with no LM pass after the question's.

The questions are easy-VQA test questions about the timed images, so the answers (and the number of decoding
steps, which stop at ``<eos>``) are the checkpoint's real ones. Each image is timed from its file (decode +
resize, vision tower, LM) and the time is divided by its number of questions. ``breakdown`` splits one
question's time into its parts (image preprocessing, vision tower + projector, the LM's prefill pass over
``[visual tokens][question]`` after the cached prompt prefix, each decoding step) with simple timers, medians
over the images.
``answers_agree_with_float32``: INT8 gave the same answer to every timed question.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import time_ms  # noqa: E402

from vqakit.models.llm_prefix import _cache_of, _with_cache  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def breakdown(model, processor, image: str, question: str) -> dict:
    """One question's time, part by part (ms), on the same path as ``answer_images`` with one question and no
    drafts (the prefill and each decoding step as separate LM passes)."""
    times = {}
    t = time.perf_counter()
    pixels = processor.images([image])
    text = processor.text([question])
    times["preprocess_ms"] = time.perf_counter() - t
    t = time.perf_counter()
    prefix = model.prefix_embeds(model.visual_tokens(pixels))
    times["vision_and_projector_ms"] = time.perf_counter() - t
    ids, mask = text["input_ids"], text["attention_mask"]
    embeds = torch.cat([prefix, model._embed(ids)], dim=1)
    full_mask = torch.ones(1, embeds.shape[1], dtype=mask.dtype)
    t = time.perf_counter()
    cache, skip = model._text_prefix_cache(1, embeds)  # the prompt prefix's cached keys/values, as served
    positions = torch.arange(skip, embeds.shape[1])[None]
    out = model.lm(inputs_embeds=embeds[:, skip:], attention_mask=full_mask, position_ids=positions,
                   **_with_cache(cache), use_cache=True, logits_to_keep=1)
    times["prefill_ms"] = time.perf_counter() - t
    times["prefill_tokens"] = embeds.shape[1] - skip
    steps, cache, nxt = [], _cache_of(out), out.logits[:, -1].argmax(-1)
    for _ in range(model.config.max_new_tokens - 1):
        if int(nxt) == model.eos_id:
            break
        full_mask = torch.cat([full_mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        t = time.perf_counter()
        out = model.lm(input_ids=nxt[:, None], attention_mask=full_mask, **_with_cache(cache), use_cache=True,
                       logits_to_keep=1)
        steps.append(time.perf_counter() - t)
        cache, nxt = _cache_of(out), out.logits[:, -1].argmax(-1)
    times["decode_steps"] = len(steps)
    times["decode_step_ms"] = statistics.median(steps) if steps else 0.0
    return {k: (round(1000 * v, 2) if k.endswith("_ms") else v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an llm_prefix checkpoint directory")
    parser.add_argument("--quantize", default="none,int8",
                        help="comma-separated: none, int8 (the default INT8: gate_proj / up_proj in INT8, the rest float32), "
                             "int8_smoothed (every layer in INT8, down_proj smoothed first), "
                             "int8_attn (the attention projections in INT8 too)")
    parser.add_argument("--images", type=int, default=20, help="timed images per setting (after 2 warm-up images)")
    parser.add_argument("--counts", default="1,5", help="questions per image")
    parser.add_argument("--drafts", default="on,off", help="comma-separated: on, off (answer drafts)")
    parser.add_argument("--max_draft_tokens", type=int, default=None,
                        help="draft tree size (default: the checkpoint's max_draft_tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/llm_latency.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vqakit.data.sources import load_source
    from vqakit.inference.generative import load_predictor

    by_image = defaultdict(list)
    for e in load_source("easy-vqa", "test"):
        by_image[e.image].append(e.question)
    counts = [int(c) for c in args.counts.split(",")]
    images = [im for im, qs in by_image.items() if len(qs) >= max(counts)][: args.images + 2]
    load_start = os.getloadavg()
    results, answers = {}, {}
    for quantize in args.quantize.split(","):
        predictor = load_predictor(args.checkpoint, device="cpu", quantize="int8" if quantize == "int8" else None)
        model, processor = predictor.model, predictor.processor
        if quantize == "int8_smoothed":
            model.quantize_int8(skip=(), smooth=0.5)
        elif quantize == "int8_attn":
            model.quantize_int8(skip=("down_proj",))
        drafts = list(model.config.draft_answers)
        if args.max_draft_tokens is not None:
            model.config.max_draft_tokens = args.max_draft_tokens
        for mode in args.drafts.split(","):
            model.set_draft_answers(drafts if mode == "on" else [])
            key = quantize if mode == "on" else f"{quantize}_no_drafts"
            results[key], answers[key] = results.get(key, {}), []
            calls = []
            hook = model.lm.register_forward_pre_hook(lambda module, a: calls.append(1))
            with torch.inference_mode():
                for n in counts:
                    per_question, one_pass = [], 0
                    for i, image in enumerate(images):
                        calls.clear()
                        preds, ms = time_ms(predictor.predict, image, by_image[image][:n])
                        if i >= 2:  # warm-up
                            per_question.append(ms / n)
                            answers[key] += [p.answer for p in preds]
                            one_pass += len(calls) == 1  # the packed prefix + questions pass only
                    results[key][f"{n}_per_image"] = {
                        "per_question_ms_p50": round(statistics.median(per_question), 2),
                        "per_question_ms_p95": round(percentile(per_question, 0.95), 2),
                        "per_question_ms_mean": round(statistics.fmean(per_question), 2),
                        "images_with_no_decoding_pass": f"{one_pass}/{len(per_question)}"}
                    print(key, n, json.dumps(results[key][f"{n}_per_image"]), flush=True)
                if mode == "off" or args.drafts == "on":
                    parts = [breakdown(model, processor, im, by_image[im][0]) for im in images]
                    results[key]["breakdown_1_question"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                    print(key, "breakdown", json.dumps(results[key]["breakdown_1_question"]), flush=True)
            hook.remove()
            results[key]["draft_tree_tokens"] = len(model.draft_tree)
            reference = "none" if "none" in answers else "none_no_drafts"
            if key != reference and reference in answers:
                agree = [a == b for a, b in zip(answers[reference], answers[key])]
                results[key][f"answers_agree_with_{reference}"] = f"{sum(agree)}/{len(agree)}"
        model.set_draft_answers(drafts)
    report = {
        "benchmark": "llm_latency", "checkpoint": args.checkpoint, "timed_images": len(images) - 2,
        "visual_tokens": model.config.num_visual_tokens, "prompt_prefix": model.config.prompt_prefix,
        "prompt": model.config.prompt, "max_new_tokens": model.config.max_new_tokens,
        "max_draft_tokens": model.config.max_draft_tokens, "draft_answers": model.config.draft_answers,
        "results": results,
        "target": "p50 <= 100 ms for one question",
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
