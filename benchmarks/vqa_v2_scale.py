"""VQA v2 at scale, measured on synthetic data (COCO cannot be downloaded here), extrapolated to the target.

    python benchmarks/vqa_v2_scale.py --images 2000 --out benchmarks/results/vqa_v2_scale.json

Two parts, each in its own process so that its peak RSS is its own:

1. ``json``: official-layout question + annotation files at full VQA v2 train size (443,757 questions on
   82,783 images, 10 answers each; no images), then ``load_vqa_v2(..., train_image_fraction=0.25)``:
   load time and peak RSS.
2. ``cache``: ``--images`` synthetic JPEGs of ``--photo_size`` (noise + shapes; default 224x224, a resized
   photo; 640x480 is a COCO photo's size) in the official layout, then ``vqakit prepare --data.dataset vqa-v2
   --cache_features true`` (validation, image check, statistics, EfficientNet-Lite0 features at 224px):
   images/s and peak RSS. With fewer than 20,000 images the time for 20,000 is an EXTRAPOLATION (linear in
   the number of images); the feature cache is memory-mapped
   and built shard by shard, so its RSS does not grow with the number of images (the JSON does, part 1).

On a shared machine the wall time mostly measures the other processes; ``cpu_s_per_image`` (CPU seconds of
the prepare process per image) does not, and ``extrapolated_20k_images_min_on_2_free_cores`` divides it over
two cores that are free, assuming the decoding threads and the tower keep both busy.

Targets (issue 6): prepare + feature cache for 20k images at 224px <= 15 minutes on 2 cores, < 4 GiB.
Real COCO images are about 640x480: decoding them costs more than 224px files, so the measured run is
``--images 20000 --photo_size 640x480`` (benchmarks/results/vqa_v2_scale_20k_640x480.json: 20,400 images in
834 s, peak RSS 1,454 MiB on 2 free cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS, IMAGES = 443_757, 82_783  # VQA v2 train2014


def write_json_only(root: Path, n_questions: int, n_images: int) -> None:
    from vqakit.data.formats import write_vqa_v2_json
    from vqakit.data.sources import vqa_v2_paths

    rng = random.Random(0)
    words = ["yes", "no", "2", "1", "white", "red", "dog", "table", "tennis", "frisbee", "3", "blue"]
    qs, anns = [], []
    for i in range(n_questions):
        image_id = 9 + (i % n_images) * 7
        qid = image_id * 1000 + i // n_images
        qs.append({"image_id": image_id, "question": f"What is the thing number {i % 977} here?", "question_id": qid})
        answers = [rng.choice(words) for _ in range(10)]
        anns.append({"question_type": "what is the", "multiple_choice_answer": answers[0], "image_id": image_id,
                     "answer_type": "other", "question_id": qid,
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                 for k, a in enumerate(answers)]})
    q_path, a_path, _ = vqa_v2_paths(root, "train")
    write_vqa_v2_json(q_path, a_path, "train2014", qs, anns)


def write_images(root: Path, n: int, photo_size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture is test code
    from fixtures.vqa_v2 import write_vqa_v2_fixture

    write_vqa_v2_fixture(root, "train", num_images=n, questions_per_image=5, seed=0)
    write_vqa_v2_fixture(root, "val", num_images=max(1, n // 50), questions_per_image=5, seed=0)
    rng = np.random.default_rng(0)
    w, h = photo_size
    for split in ("train2014", "val2014"):  # replace the tiny fixture drawings with photo-like JPEGs
        for path in sorted((root / split).glob("*.jpg")):
            base = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
            im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
            draw = ImageDraw.Draw(im)
            for _ in range(4):
                x, y = rng.integers(0, w - w // 6), rng.integers(0, h - h // 7)
                draw.ellipse((int(x), int(y), int(x) + w // 6, int(y) + h // 7),
                             fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            im.save(path, "JPEG", quality=90)


def part_json(tmp: Path) -> dict:
    """Write the full-size JSON in one process, load it in a fresh one (so the load's peak RSS is its own)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--part", "json-write", "--root", str(tmp)], check=True)
    written = time.perf_counter() - start
    out = tmp / "load.json"
    subprocess.run([sys.executable, __file__, "--part", "json-load", "--root", str(tmp), "--out", str(out)], check=True)
    result = json.loads(out.read_text())
    result.update(write_s=round(written, 1), json_mib=round(sum(p.stat().st_size for p in tmp.glob("v2_*.json")) / 2**20))
    return result


def json_load(root: Path) -> dict:
    from vqakit.data.sources import load_vqa_v2

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    data = load_vqa_v2(root, "train", train_image_fraction=0.25, seed=0)
    return {"questions_total": QUESTIONS, "images_total": IMAGES, "sampled_images": len(data.sampled_image_ids),
            "sampled_questions": len(data), "load_s": round(time.perf_counter() - start, 1),
            "rss_mib_after_imports": round(rss_before),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def part_cache(tmp: Path, n: int, photo_size: tuple[int, int]) -> dict:
    start = time.perf_counter()
    write_images(tmp, n, photo_size)
    write_s = time.perf_counter() - start
    cmd = [sys.executable, "-m", "vqakit.cli", "prepare", "--config", "vqa-v2", "--data.root", str(tmp),
           "--data.train_image_fraction", "1.0", "--data.cache_dir", str(tmp / "cache"), "--out_dir", str(tmp / "prep"),
           "--cache_features", "true"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    stats = json.loads((tmp / "prep" / "vqa-v2" / "stats.json").read_text())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = usage.ru_utime + usage.ru_stime
    n_images = stats["feature_cache"]["images"]
    per_image = wall / n_images
    return {"images": n_images, "photo_size": list(photo_size), "jpeg_mib": round(sum(
                p.stat().st_size for p in (tmp / "train2014").glob("*.jpg")) / 2**20),
            "write_images_s": round(write_s, 1), "image_size": 224, "prepare_wall_s": round(wall, 1),
            "images_per_s_end_to_end": round(n_images / wall, 2), "feature_cache": stats["feature_cache"],
            "prepare_cpu_s": round(cpu_s, 1), "cpu_s_per_image": round(cpu_s / n_images, 4),
            "peak_rss_mib": round(usage.ru_maxrss / 1024),
            # EXTRAPOLATIONS, linear in the number of images
            "extrapolated_20k_images_wall_min": round(20_000 * per_image / 60, 1),
            "extrapolated_20k_images_min_on_2_free_cores": round(20_000 * cpu_s / n_images / 2 / 60, 1)}


def photo_size(value: str) -> tuple[int, int]:
    """``--photo_size`` as ``WxH``, e.g. ``640x480``."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--photo_size={value!r} is not WxH, e.g. 640x480") from None
    if w < 48 or h < 48:
        raise argparse.ArgumentTypeError(f"--photo_size={value!r}: width and height must be at least 48 pixels")
    return w, h


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--part", choices=["json", "cache", "both", "json-write", "json-load"], default="both")
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/vqa_v2_scale.json")
    ap.add_argument("--photo_size", type=photo_size, default=(224, 224),
                    help="WxH of the synthetic JPEGs (default 224x224; COCO photos: ~640x480)")
    args = ap.parse_args(argv)
    if args.part == "json-write":
        return write_json_only(Path(args.root), QUESTIONS, IMAGES)
    if args.part == "json-load":
        return Path(args.out).write_text(json.dumps(json_load(Path(args.root))))
    result = {"benchmark": "vqa_v2_scale", "cpus": os.cpu_count(), "torch_threads_env": os.environ.get("OMP_NUM_THREADS"),
              "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="vqakit-scale-") as tmp:
        if args.part in ("json", "both"):
            (Path(tmp) / "json").mkdir()
            result["json"] = part_json(Path(tmp) / "json")
        if args.part in ("cache", "both"):
            (Path(tmp) / "cache_part").mkdir()
            result["cache"] = part_cache(Path(tmp) / "cache_part", args.images, args.photo_size)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
