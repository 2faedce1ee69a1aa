"""Predict latency with the model loaded: one image + one question per call, distinct pairs, CPU.

    python benchmarks/latency.py --checkpoint runs/easy-vqa/checkpoint [--backend onnx|torch] [--n 200]

Prints and writes JSON (``--out``): p50 / p95 / mean milliseconds per call of
``VQAPredictor.predict(image_path, question)`` over ``--n`` distinct easy-VQA test questions, each on
its own image file (decoding and preprocessing included), after ``--warmup`` calls. ``--backend onnx``
exports the checkpoint to ONNX first if needed (``vqakit export``). Target (issue 2): p50 <= 15 ms on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/easy-vqa/checkpoint")
    ap.add_argument("--n", type=int, default=200, help="timed calls")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    ap.add_argument("--backend", default="onnx", choices=["torch", "onnx"])
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/latency-<backend>.json)")
    args = ap.parse_args(argv)

    import torch

    from vqakit.data.sources import load_easy_vqa
    from vqakit.inference.predict import VQAPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = VQAPredictor.from_pretrained(args.checkpoint, device="cpu", backend=args.backend,
                                             threads=args.threads)
    examples = load_easy_vqa("test")
    seen, pairs = set(), []
    for e in examples:  # one question per image: no image is seen twice
        if e.image_id not in seen:
            seen.add(e.image_id)
            pairs.append((e.image, e.question))
    pairs = pairs[: args.warmup + args.n]
    for image, question in pairs[: args.warmup]:
        predictor.predict(image, question)
    times = []
    for image, question in pairs[args.warmup :]:
        start = time.perf_counter()
        predictor.predict(image, question)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    result = {
        "benchmark": "predict_latency",
        "checkpoint": args.checkpoint,
        "backend": predictor.backend,
        "calls": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
        "mean_ms": round(statistics.fmean(times), 2),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out or f"benchmarks/results/latency-{predictor.backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
