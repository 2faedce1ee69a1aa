"""Which ONNX Runtime layout answers batches of distinct questions fastest: towers one after the other or in
parallel, intra-op threads, float32 or INT8.

    python benchmarks/onnx_layouts.py --checkpoint runs/easy-vqa/checkpoint [--rounds 2]

Times ``VQAPredictor.predict_prepared`` over B already-preprocessed easy-VQA test images with one distinct
question each (``"<question> #<k>"``, question cache off), for B in 1, 16, 32 (what the REST service's
micro-batcher hands the model), swapping only the predictor's ``OnnxParts``. Variants run in turns within each
round. Writes ``--out`` (default benchmarks/results/onnx_layouts.json): median ms per batch per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import time_ms  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/easy-vqa/checkpoint")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/onnx_layouts.json")
    args = ap.parse_args(argv)

    from vqakit.data.sources import load_easy_vqa
    from vqakit.inference.export import ensure_onnx
    from vqakit.inference.onnx_runtime import OnnxParts
    from vqakit.inference.predict import VQAPredictor

    predictor = VQAPredictor.from_pretrained(args.checkpoint, device="cpu")
    fp32, int8 = ensure_onnx(args.checkpoint), ensure_onnx(args.checkpoint, "int8")
    seen, pairs = set(), []
    for e in load_easy_vqa("test"):
        if e.image_id not in seen:
            seen.add(e.image_id)
            pairs.append((e.image, e.question))
    pixels = [predictor.prepare_image(image) for image, _ in pairs[:400]]
    questions = [q for _, q in pairs[:400]]
    variants = {
        "sequential, default threads": OnnxParts(fp32, parallel_towers=False),
        "parallel, 1 thread each": OnnxParts(fp32),
        "parallel, 2 threads each": OnnxParts(fp32, 2),
        "int8 sequential, default threads": OnnxParts(int8, parallel_towers=False),
        "int8 parallel, 1 thread each": OnnxParts(int8),
    }
    results: dict = {}
    k = 0
    for r in range(args.rounds):
        for B in (1, 16, 32):
            for name, parts in variants.items():
                predictor.onnx = parts
                times = []
                for _ in range(100 if B == 1 else max(40, 320 // B)):
                    k += 1
                    idx = [(k * B + j) % len(pixels) for j in range(B)]
                    times.append(time_ms(predictor.predict_prepared, [pixels[j] for j in idx],
                                         [[f"{questions[j]} #{k}-{j}"] for j in idx])[1])
                median = round(statistics.median(times), 2)
                results.setdefault(f"B={B}", {}).setdefault(name, []).append(median)
                print(json.dumps({"round": r, "B": B, "variant": name, "p50_ms_per_batch": median,
                                  "questions_per_s": round(1000 * B / median, 1)}), flush=True)
    result = {"benchmark": "onnx_layouts", "checkpoint": args.checkpoint, "p50_ms_per_batch_per_round": results,
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
