"""Which data a run uses, as one typed config, and the function that turns it into examples."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

from vqakit.data.example import Example


@dataclass
class DataConfig:
    """Data for a run.

    Args:
        dataset: ``easy-vqa`` (packaged), ``vqa-v2`` (official files under ``root``), ``shapes-rel`` (procedural,
            generated under the cache when ``root`` is unset), ``jsonl`` / ``csv`` / ``image-json`` (under ``root``), or
            ``hf`` (a Hugging Face ``datasets`` directory written by ``save_to_disk``, or a Hub id, in ``root``).
        root: dataset directory (``vqa-v2``: the folder with the official JSON files and image folders; ``hf``: a
            ``save_to_disk`` directory or a Hub dataset id).
        train_split: split to train on.
        eval_split: split to evaluate on after training (easy-VQA: ``test``; VQA v2: ``val``).
        train_image_fraction: fraction of training *images* kept (all their questions stay), e.g. 0.25.
        seed: seed of every sampling step (image fraction, validation hold-out, limits).
        val_fraction: fraction of training images held out for validation during training.
        questions_per_image: keep at most this many questions of each training image (seeded): more distinct
            images for the same number of training steps, where a step costs a lot (e.g. the LLM-prefix recipe).
        limit: keep only about this many questions per split (whole images, seeded): for quick runs.
        eval_limit: the same for every split but ``train_split`` (default: ``limit``), e.g. a long training run
            evaluated on a fixed test subset.
        top_k_answers: size of the answer vocabulary (most frequent normalised answers).
        cache_dir: feature cache directory (default ``$VQAKIT_CACHE`` or ``~/.cache/vqakit``).
        scan_images: decode every image once before training and skip broken ones, with a report.
        num_workers: DataLoader worker processes.
        source_options: extra settings of the dataset's loader; ``shapes-rel``: the fields of ``ShapesRelConfig``
            (``num_train_images``, ``num_val_images``, ``occlusion``, ...), e.g. ``{num_train_images: 20000}``
            generates (once, under the cache) and trains on 20,000 scenes; ``hf``: the column mapping (``image``,
            ``question``, ``answers`` or ``answer``, ``question_id``, ``image_id``, ``answer_type``,
            ``question_type``) and ``name`` / ``revision`` / ``image_root``, e.g. ``{image: img, question: q}``.
    """

    dataset: str = "easy-vqa"
    root: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    train_image_fraction: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05
    questions_per_image: int | None = None
    limit: int | None = None
    eval_limit: int | None = None
    top_k_answers: int = 1000
    cache_dir: str | None = None
    scan_images: bool = True
    num_workers: int = 0
    source_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.train_image_fraction <= 1.0:
            raise ValueError(f"--data.train_image_fraction={self.train_image_fraction} must be in (0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.questions_per_image is not None and self.questions_per_image < 1:
            raise ValueError(f"--data.questions_per_image={self.questions_per_image} must be a positive number")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--data.limit={self.limit} must be a positive number of questions")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"--data.eval_limit={self.eval_limit} must be a positive number of questions")
        if self.top_k_answers < 1:
            raise ValueError(f"--data.top_k_answers={self.top_k_answers} must be at least 1")


def load_split(cfg: DataConfig, split: str) -> list[Example]:
    """The examples of one split, sampled and limited as ``cfg`` says."""
    from vqakit.data.sources import load_source

    kwargs = dict(cfg.source_options)
    if cfg.source_options and cfg.dataset == "shapes-rel":
        from vqakit.data.procedural import ShapesRelConfig

        known = {f.name for f in fields(ShapesRelConfig)}
        unknown = sorted(set(cfg.source_options) - known)
        if unknown:
            raise ValueError(f"--data.source_options has {unknown}, not settings of shapes-rel; known = {sorted(known)}")
    elif cfg.dataset == "hf":
        from vqakit.data.hf import COLUMN_CANDIDATES, OTHER_OPTIONS

        known = [*COLUMN_CANDIDATES, *(o for o in OTHER_OPTIONS if o != "cache_dir")]
        unknown = sorted(set(cfg.source_options) - set(known))
        if unknown:
            raise ValueError(f"--data.source_options has {unknown}, not options of the hf source; known = {known}")
        if cfg.cache_dir is not None:
            kwargs["cache_dir"] = cfg.cache_dir  # where encoded images are written
    elif cfg.source_options:
        raise ValueError(f"--data.source_options={cfg.source_options} is not supported for dataset {cfg.dataset!r} "
                         f"(only shapes-rel and hf take options)")
    if cfg.root is not None:
        kwargs["root"] = cfg.root
    if cfg.dataset == "vqa-v2" and split == cfg.train_split:
        kwargs.update(train_image_fraction=cfg.train_image_fraction, seed=cfg.seed)
    examples = load_source(cfg.dataset, split, **kwargs)
    if cfg.dataset != "vqa-v2" and split == cfg.train_split and cfg.train_image_fraction < 1.0:
        examples = sample_images(examples, cfg.train_image_fraction, cfg.seed)
    if cfg.questions_per_image is not None and split == cfg.train_split:
        examples = questions_per_image(examples, cfg.questions_per_image, cfg.seed)
    limit = cfg.limit if split == cfg.train_split or cfg.eval_limit is None else cfg.eval_limit
    if limit is not None:
        examples = limit_questions(examples, limit, cfg.seed)
    return examples


def _images_in_random_order(examples: list[Example], seed: int) -> list[int]:
    ids = sorted({e.image_id for e in examples})
    random.Random(seed).shuffle(ids)
    return ids


def sample_images(examples: list[Example], fraction: float, seed: int) -> list[Example]:
    """Keep a seeded ``fraction`` of the images and all of their questions (as VQA v2's loader does)."""
    from vqakit.data.sources import sample_image_ids

    keep = set(sample_image_ids([e.image_id for e in examples], fraction, seed))
    return [e for e in examples if e.image_id in keep]


def questions_per_image(examples: list[Example], n: int, seed: int) -> list[Example]:
    """Keep at most ``n`` questions of each image, a seeded random choice, in the original order."""
    by_image: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_image.setdefault(e.image_id, []).append(i)
    rng, keep = random.Random(seed), set()
    for image_id in sorted(by_image):
        idx = by_image[image_id]
        keep.update(rng.sample(idx, n) if len(idx) > n else idx)
    return [e for i, e in enumerate(examples) if i in keep]


def limit_questions(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """Keep whole images, in seeded random order, until at least ``limit`` questions are kept."""
    if len(examples) <= limit:
        return examples
    per_image: dict[int, int] = {}
    for e in examples:
        per_image[e.image_id] = per_image.get(e.image_id, 0) + 1
    keep, n = set(), 0
    for image_id in _images_in_random_order(examples, seed):
        if n >= limit:
            break
        keep.add(image_id)
        n += per_image[image_id]
    return [e for e in examples if e.image_id in keep]


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded ``fraction`` of the images (with all their questions) for validation."""
    if fraction <= 0:
        return examples, []
    ids = _images_in_random_order(examples, seed + 1)
    held = set(ids[: max(1, round(fraction * len(ids)))])
    return [e for e in examples if e.image_id not in held], [e for e in examples if e.image_id in held]


def fingerprint(examples: list[Example]) -> str:
    """A hash of the examples (ids, questions, answers, image paths): which data a checkpoint saw."""
    h = hashlib.sha1()
    for e in examples:
        h.update(json.dumps([e.question_id, e.image_id, e.question, e.answers, Path(e.image).name]).encode())
    return h.hexdigest()[:16]

