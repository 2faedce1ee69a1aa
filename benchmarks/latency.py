"""Predict latency with the model loaded: one image + one question per call, CPU, variants side by side.

    python benchmarks/latency.py --checkpoint runs/easy-vqa/checkpoint [--variants auto,torch,int8] [--n 200]
        [--repeats 3] [--distinct]

Each variant is one ``VQAPredictor.from_pretrained`` call, loaded in this process, which never calls
``export`` itself: ``auto`` is the default path (``from_pretrained(dir)`` with no argument: ONNX Runtime over the
checkpoint's verified export, made on first load if needed), ``torch`` / ``onnx`` force a backend, ``int8`` is
``backend="auto", quantize="int8"``. The variants are timed in turns (``--repeats`` rounds of ``--n`` calls each,
after ``--warmup`` calls), so a load change on the machine hits them alike.

A call is ``predict(image_path, question)`` on its own easy-VQA test image (decoding and preprocessing included).
The question cache is off (the predictor's default). ``--distinct`` makes every question string distinct
(``"<test question> #<k>"``): the text tower runs on every call either way, so this checks that nothing repeated
is cheaper. Prints and writes JSON (``--out``, default benchmarks/results/latency.json): per variant and round
p50 / p95 / p99 / mean ms, the load time, and whether an export was made during the load (it should be made
once, by the first variant needing it, or be there from training). Target (issue): the default path's p50 <= 15 ms
(stretch 8 ms) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import latency_summary, time_ms  # noqa: E402

VARIANTS = {
    "auto": {},  # the default path: INT8 where the checkpoint's INT8 check passed, else float32
    "float32": {"quantize": None},  # the default backend, forced to float32
    "torch": {"backend": "torch", "quantize": None},
    "onnx": {"backend": "onnx", "quantize": None},
    "int8": {"quantize": "int8"},
    "torch-int8": {"backend": "torch", "quantize": "int8"},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/easy-vqa/checkpoint")
    ap.add_argument("--variants", default="auto,torch", help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--n", type=int, default=200, help="timed calls per variant and round")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each times every variant in turn")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    ap.add_argument("--distinct", action="store_true", help="every question string distinct")
    ap.add_argument("--out", default="benchmarks/results/latency.json")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants {unknown} unknown; available = {sorted(VARIANTS)}")

    import torch

    from vqakit.data.sources import load_easy_vqa
    from vqakit.inference.export import export_is_current
    from vqakit.inference.predict import VQAPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    seen, pairs = set(), []
    for e in load_easy_vqa("test"):  # one question per image: no image is seen twice
        if e.image_id not in seen:
            seen.add(e.image_id)
            pairs.append((e.image, e.question))
    need = args.warmup + args.n * args.repeats
    if need > len(pairs):
        ap.error(f"--warmup + --n x --repeats = {need} calls, more than the {len(pairs)} test images")
    if args.distinct:
        pairs = [(image, f"{q} #{k}") for k, (image, q) in enumerate(pairs)]

    predictors, loads = {}, {}
    for name in variants:
        exported_before = export_is_current(args.checkpoint)
        start = time.perf_counter()
        predictors[name] = VQAPredictor.from_pretrained(args.checkpoint, device="cpu", threads=args.threads,
                                                        **VARIANTS[name])
        loads[name] = {"load_s": round(time.perf_counter() - start, 2), "backend": predictors[name].backend,
                       "export_was_current_before_load": exported_before}
        for image, question in pairs[: args.warmup]:
            predictors[name].predict(image, question)
    rounds = {name: [] for name in variants}
    for r in range(args.repeats):
        chunk = pairs[args.warmup + r * args.n: args.warmup + (r + 1) * args.n]
        for name in variants:  # in turns: the same images and load conditions for every variant
            times = [time_ms(predictors[name].predict, image, question)[1] for image, question in chunk]
            rounds[name].append(latency_summary(times))
            print(json.dumps({"variant": name, "round": r, **rounds[name][-1]}), flush=True)
    result = {
        "benchmark": "predict_latency",
        "checkpoint": args.checkpoint,
        "distinct_questions": args.distinct,
        "question_cache": "off",
        "variants": {name: {**VARIANTS[name], **loads[name], "rounds": rounds[name]} for name in variants},
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
