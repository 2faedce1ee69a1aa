"""INT8 dynamic quantization of the Linear layers: accuracy and latency against float32, per backend.

    python benchmarks/quantize.py --checkpoint runs/easy-vqa/checkpoint [--backends onnx,torch] [--n 200]

For each backend (ONNX Runtime, PyTorch) and precision (float32, ``quantize="int8"``):

- accuracy: official VQA accuracy on the whole easy-VQA test split (9,673 questions), answered through
  ``VQAPredictor.predict_batch`` (64 images and all their questions per call, repeated questions' text states
  cached), and the number of questions whose top answer differs from float32's on the same backend;
- latency: p50 / p95 ms of ``predict(image_path, question)``, one distinct test image and question per call,
  after a warm-up (as benchmarks/latency.py).

Writes ``--out`` (default benchmarks/results/quantize.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import percentile, time_ms  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/easy-vqa/checkpoint")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--n", type=int, default=200, help="timed single calls per variant")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    ap.add_argument("--limit", type=int, default=None, help="test questions to score (default: all)")
    ap.add_argument("--out", default="benchmarks/results/quantize.json")
    args = ap.parse_args(argv)

    import torch

    from vqakit.data.sources import load_easy_vqa
    from vqakit.eval.vqa_accuracy import vqa_accuracy
    from vqakit.inference.predict import VQAPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    examples = load_easy_vqa("test")[: args.limit]
    by_image: dict[str, list] = {}
    for e in examples:
        by_image.setdefault(e.image, []).append(e)
    images = list(by_image)
    pairs = [(image, by_image[image][0].question) for image in images][: args.warmup + args.n]

    rows, reference = [], {}
    for backend in args.backends.split(","):
        for quantize in (None, "int8"):
            # the test pass reuses each distinct question's text states (they come from this variant's own
            # text tower, so accuracy is unchanged); the timed single calls run the whole model
            predictor = VQAPredictor.from_pretrained(args.checkpoint, device="cpu", backend=backend,
                                                     threads=args.threads, quantize=quantize, question_cache=4096)
            start = time.perf_counter()
            answers = []
            for i in range(0, len(images), 64):
                chunk = images[i:i + 64]
                batch = predictor.predict_batch(chunk, [[e.question for e in by_image[im]] for im in chunk])
                answers += [p.answer for preds in batch for p in preds]
            pass_s = time.perf_counter() - start
            ordered = [e for im in images for e in by_image[im]]
            accuracy = 100 * statistics.fmean(vqa_accuracy(a, e.answers) for a, e in zip(answers, ordered))
            if quantize is None:
                reference[backend] = answers
            changed = sum(a != b for a, b in zip(answers, reference[backend]))
            predictor.question_cache = None
            for image, question in pairs[: args.warmup]:
                predictor.predict(image, question)
            times = sorted(time_ms(predictor.predict, image, question)[1] for image, question in pairs[args.warmup:])
            row = {"backend": backend, "precision": quantize or "float32", "questions": len(answers),
                   "vqa_accuracy": round(accuracy, 2), "answers_changed_vs_float32": changed,
                   "test_pass_s": round(pass_s, 1), "p50_ms": round(statistics.median(times), 2),
                   "p95_ms": percentile(times, 0.95)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"benchmark": "int8_dynamic_quantization", "checkpoint": args.checkpoint, "rows": rows,
              "torch_threads": torch.get_num_threads(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
              "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
