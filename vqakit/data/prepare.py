"""Dataset preparation (``vqakit prepare``): load and validate a dataset, check every image, build the answer
vocabulary, write statistics and, optionally, fill the feature cache of a model's frozen towers.

One idempotent pipeline per run (nanoGPT's ``data/*/prepare.py``): rerunning it rewrites the same files, and a killed
feature-cache fill resumes from its last finished shard. The artifacts, under ``{out_dir}/{dataset}/``:
``{split}.jsonl`` (one example per line), ``answer_vocab.json``, ``stats.json`` and, for a sampled VQA v2 training
split, ``sample.json`` (the sampled image ids).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from vqakit.data.config import DataConfig

if TYPE_CHECKING:  # the model and training configs only type the arguments: no model code runs at import
    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.train.config import TrainConfig


def prepare_dataset(data: DataConfig, out_dir: str | Path, model: "TwoTowerConfig", train: "TrainConfig",
                    cache_features: bool = False, workers: int = 4) -> dict:
    """Prepare ``data`` into ``{out_dir}/{data.dataset}/`` and return the statistics written to ``stats.json``.

    Args:
        data: which dataset and splits.
        out_dir: where the prepared files go.
        model: the model whose (frozen) towers' features are cached.
        train: the training settings: only towers that ``train.vision`` / ``train.text`` freeze are cached.
        cache_features: encode every image and question once into the feature cache.
        workers: threads that check and decode images.
    """
    import os
    import time

    from vqakit.data.answers import AnswerVocab
    from vqakit.data.config import load_split
    from vqakit.data.images import filter_examples, scan_images
    from vqakit.data.stats import dataset_stats, format_stats

    target = Path(out_dir) / data.dataset
    target.mkdir(parents=True, exist_ok=True)
    stats = {"dataset": data.dataset, "splits": {}}
    kept = {}
    loaded, load_s = {}, {}
    for split in dict.fromkeys([data.train_split, data.eval_split]):
        start = time.perf_counter()
        examples = load_split(data, split)
        if not examples:
            raise ValueError(f"{data.dataset} split {split!r} has no questions (root={data.root})")
        paths = {e.image_id: e.image for e in examples}
        if not any(os.path.exists(p) for p in list(paths.values())[:1000]):
            folder = Path(next(iter(paths.values()))).parent
            raise FileNotFoundError(
                f"{data.dataset} {split}: none of the images exist, e.g. {next(iter(paths.values()))}; expected "
                f"{len(paths):,} image files in {folder}" + (" (unzip train2014.zip / val2014.zip from "
                "https://cocodataset.org into --data.root)" if data.dataset == "vqa-v2" else "")
            )
        loaded[split], load_s[split] = examples, time.perf_counter() - start
    # with a frozen vision tower, decoding each image for its features is the image check: one pass, not two
    one_pass = cache_features and train.vision == "frozen"
    reports, cached = {}, {}
    if one_pass:
        cached = _check_and_cache_images(model, data, loaded, workers)
        reports = cached.pop("reports")
    for split, examples in loaded.items():
        start = time.perf_counter() - load_s[split]
        paths = {e.image_id: e.image for e in examples}
        report = reports[split] if one_pass else scan_images(paths, workers=workers)
        examples = filter_examples(examples, report)
        for image_id, path, reason in report.bad[:20]:
            print(f"{split}: skipped image {image_id} ({path}): {reason}")
        kept[split] = examples
        with open(target / f"{split}.jsonl", "w") as f:
            for e in examples:
                f.write(json.dumps(e.to_dict()) + "\n")
        if data.dataset == "vqa-v2" and split == data.train_split and data.train_image_fraction < 1.0:
            from vqakit.data.sources import vqa_v2_split_name

            sample = {"dataset": "vqa-v2", "split": vqa_v2_split_name(split), "fraction": data.train_image_fraction,
                      "seed": data.seed, "image_ids": sorted(paths)}
            (target / "sample.json").write_text(json.dumps(sample) + "\n")
        stats["splits"][split] = {
            "questions": len(examples),
            "images": len({e.image_id for e in examples}),
            "bad_images": len(report.bad),
            "answer_types": dict(Counter(e.answer_type for e in examples)),
        }
        if report.bad:  # every skipped image, with the reason, so none is lost silently
            stats["splits"][split]["bad"] = [{"image_id": i, "path": p, "reason": r} for i, p, r in report.bad]
        stats.setdefault("seconds", {})[split] = round(time.perf_counter() - start, 1)
        print(f"{split}: {len(examples):,} questions, {stats['splits'][split]['images']:,} images; {report.summary()}")
        if any(e.answers for e in examples):
            details = dataset_stats(examples, fit_examples=kept.get(data.train_split))
            stats.setdefault("statistics", {})[split] = details
            print(format_stats(details, f"{data.dataset} {split}"))
        if split == data.train_split:
            vocab = AnswerVocab.build([e.answers for e in examples], top_k=data.top_k_answers)
            vocab.to_json(target / "answer_vocab.json")
            coverage = vocab.coverage([e.answers for e in examples])
            stats["answer_vocab"] = {"size": len(vocab), "coverage": round(100 * coverage, 2)}
            print(f"answer vocabulary: {len(vocab)} answers cover {100 * coverage:.2f}% of {split} questions")
    if cache_features:
        stats["feature_cache"] = _cache_features(model, data, kept, vocab, workers, train, cached)
    (target / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {target}")
    return stats


def _towers(model_cfg: "TwoTowerConfig", id2label: dict):
    """The model whose towers fill the cache, and its processor (the head is never run)."""
    from vqakit.models.two_tower import TwoTowerConfig as Config
    from vqakit.models.two_tower import TwoTowerForQuestionAnswering
    from vqakit.towers.processor import VQAProcessor

    cfg = Config(**{**asdict(model_cfg), "id2label": id2label})
    return TwoTowerForQuestionAnswering(cfg).eval(), VQAProcessor.from_config(cfg)


def _check_and_cache_images(model_cfg: "TwoTowerConfig", data: DataConfig, splits: dict, workers: int) -> dict:
    """Decode every image of ``splits`` once, both to check it and to cache its frozen vision features.

    Returns ``{"reports": {split: ImageCheckReport}, "net", "processor", "image_seconds"}``; a broken image
    gets no cache row and is in its split's report with its id and the reason (resumed runs try it again).
    """
    import time

    from vqakit.data.images import ImageCheckReport
    from vqakit.data.features import cache_image_features

    # the answer vocabulary is not known yet and only the towers run here: a one-answer head stands in
    net, processor = _towers(model_cfg, {0: "unused"})
    root = None if data.cache_dir is None else Path(data.cache_dir) / "features"
    images = list(dict.fromkeys(e.image for exs in splits.values() for e in exs))
    bad: dict[str, str] = {}
    start = time.perf_counter()
    cache_image_features(net, processor, images, root, progress=True, workers=workers,
                         on_error=lambda path, error: bad.__setitem__(path, error.reason))
    reports = {}
    for split, examples in splits.items():
        paths = {e.image_id: e.image for e in examples}
        reports[split] = ImageCheckReport(
            ok=sorted(i for i, p in paths.items() if p not in bad),
            bad=sorted(((i, str(p), bad[p]) for i, p in paths.items() if p in bad), key=lambda b: b[0]),
        )
    return {"reports": reports, "net": net, "processor": processor,
            "image_seconds": time.perf_counter() - start}


def _cache_features(model_cfg: "TwoTowerConfig", data: DataConfig, splits: dict, vocab, workers: int,
                    train: "TrainConfig", cached: dict | None = None) -> dict:
    """Encode every image and question of ``splits`` with ``model_cfg``'s towers into the feature cache
    (the images are skipped when ``cached``, from ``_check_and_cache_images``, did them already)."""
    import time

    from vqakit.data.features import cache_image_features, cache_text_features

    if cached:
        net, processor = cached["net"], cached["processor"]
    else:
        net, processor = _towers(model_cfg, vocab.id2label)
    root = None if data.cache_dir is None else Path(data.cache_dir) / "features"
    examples = [e for exs in splits.values() for e in exs]
    images = list(dict.fromkeys(e.image for e in examples))
    start = time.perf_counter()
    if train.vision == "frozen" and not cached:
        cache_image_features(net, processor, images, root, progress=True, workers=workers)
    image_s = time.perf_counter() - start + (cached["image_seconds"] if cached else 0.0)
    if train.text == "frozen":
        cache_text_features(net, processor, [e.question for e in examples], root, progress=True)
    out = {"images": len(images), "image_seconds": round(image_s, 1),
           "images_per_s": round(len(images) / max(image_s, 1e-9), 1),
           "total_seconds": round(time.perf_counter() - start, 1)}
    print(f"feature cache: {len(images):,} images in {image_s:.1f} s ({out['images_per_s']} images/s)")
    return out
