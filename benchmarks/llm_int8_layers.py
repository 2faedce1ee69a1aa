"""Which LM layers the LLM prefix's INT8 serving quantizes, side by side: per-pass latency and agreement with
float32. Writes benchmarks/results/llm_int8_layers.json.

    python benchmarks/llm_int8_layers.py --checkpoint runs/easy-vqa-llm-stage4/checkpoint --threads 2

Variants (``LLMPrefixForQuestionAnswering.quantize_int8``):
- ``int8``: the prompt prefix's keys/values from float32, ``down_proj`` smoothed (SmoothQuant, alpha 0.5) and
  quantized with the other Linear layers (``quantize_int8(skip=(), smooth=0.5)``);
- ``int8_float_down``: the prompt prefix cached, ``down_proj`` kept in float32, the attention projections in
  INT8 (the default also keeps those in float32: ``INT8_FLOAT32_LAYERS``);
- ``int8_float_down_no_prefix_cache``: ``down_proj`` in float32 and the whole prefix run through the INT8 LM.

Timing: for each of ``--images`` easy-VQA test questions (after 5 warm-up ones), the prefill pass over
``[visual tokens][question]`` (after the cached prompt prefix, where there is one) and one decoding step, every
variant on the same question in turn, so that the machine's load falls on all of them alike; medians.
Agreement: the next-token logits at every question position (teacher-forced) against the float32 LM's with the
full prefix: top-1 agreement there and at the last position (where the answer starts), and the mean KL divergence.
On a checkpoint whose projector is untrained the LM still runs on its real weights, so the activation outliers that
INT8 has to handle are the LM's own; the answers' accuracy needs a trained checkpoint (``vqakit evaluate
--quantize int8``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from vqakit.models.llm_prefix import _cache_of, _with_cache


def pass_inputs(model, processor, image, question):
    ids = processor.text([question])["input_ids"]
    return torch.cat([model.prefix_embeds(model.visual_tokens(processor.images([image]))), model._embed(ids)], 1)


def question_logits(model, embeds, start: int) -> tuple[torch.Tensor, float, float]:
    """Logits (T - start, V) at positions start.. of ``embeds`` through the model as served, the prefill's ms and
    one decoding step's ms."""
    T = embeds.shape[1]
    cache, skip = model._text_prefix_cache(1, embeds)
    t = time.perf_counter()
    out = model.lm(inputs_embeds=embeds[:, skip:], attention_mask=torch.ones(1, T, dtype=torch.long),
                   position_ids=torch.arange(skip, T)[None], **_with_cache(cache), use_cache=True)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1].argmax(-1)
    model.lm(input_ids=nxt[:, None], attention_mask=torch.ones(1, T + 1, dtype=torch.long),
             **_with_cache(_cache_of(out)), use_cache=True, logits_to_keep=1)
    t2 = time.perf_counter()
    return out.logits[0, start - skip :].float(), 1000 * (t1 - t), 1000 * (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an llm_prefix checkpoint directory")
    parser.add_argument("--images", type=int, default=60, help="timed questions, one per image")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/llm_int8_layers.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vqakit.data.sources import load_source
    from vqakit.inference.generative import load_predictor

    base = load_predictor(args.checkpoint, device="cpu").model
    base._text_cache = None
    processor = base.processor
    variants = {}
    for name, kwargs, prefix_cache in [("int8", {"skip": (), "smooth": 0.5}, True),
                                       ("int8_float_down", {"skip": ("down_proj",), "smooth": None}, True),
                                       ("int8_float_down_no_prefix_cache", {"skip": ("down_proj",), "smooth": None},
                                        False)]:
        model = copy.deepcopy(base)
        model.quantize_int8(**kwargs)
        if not prefix_cache:
            model._text_cache = None
        variants[name] = model
    seen, examples = set(), []
    for e in load_source("easy-vqa", "test"):
        if e.image not in seen:
            seen.add(e.image)
            examples.append(e)
        if len(examples) == args.images + 5:
            break
    start = base.prefix_ids.shape[1]
    load_start = os.getloadavg()
    timing = {k: {"prefill_ms": [], "decode_step_ms": []} for k in variants}
    agree = {k: {"last": [], "all": [], "kl": []} for k in variants}
    with torch.inference_mode():
        for i, e in enumerate(examples):
            embeds = pass_inputs(base, processor, e.image, e.question)
            ref = base.lm(inputs_embeds=embeds).logits[0, start:].float()
            for name, model in variants.items():
                logits, prefill, decode = question_logits(model, embeds, start)
                if i < 5:
                    continue
                timing[name]["prefill_ms"].append(prefill)
                timing[name]["decode_step_ms"].append(decode)
                agree[name]["last"].append(float(logits[-1].argmax() == ref[-1].argmax()))
                agree[name]["all"] += (logits.argmax(-1) == ref.argmax(-1)).float().tolist()
                kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                reduction="none").sum(-1)
                agree[name]["kl"] += kl.tolist()
    results = {name: {"prefill_ms_p50": round(statistics.median(timing[name]["prefill_ms"]), 2),
                      "decode_step_ms_p50": round(statistics.median(timing[name]["decode_step_ms"]), 2),
                      "top1_agreement_last_position": round(statistics.fmean(agree[name]["last"]), 4),
                      "top1_agreement_question_positions": round(statistics.fmean(agree[name]["all"]), 4),
                      "mean_kl_to_float32": round(statistics.fmean(agree[name]["kl"]), 4)} for name in variants}
    for name, r in results.items():
        print(name, json.dumps(r), flush=True)
    report = {"benchmark": "llm_int8_layers", "checkpoint": args.checkpoint, "questions": len(examples) - 5,
              "results": results, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
