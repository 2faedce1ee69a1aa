"""Dataset sources: each turns a dataset on disk into a ``list[Example]``. Images are never opened here.

Sources:
    - ``easy-vqa``: the synthetic shapes dataset shipped inside the ``easy-vqa`` pip package
      (https://github.com/vzhou842/easy-VQA). train: 38,575 questions / 4,000 images; test: 9,673 / 1,000;
      13 answers; one answer per question, repeated 10 times.
    - ``vqa-v2``: VQA v2 in its official layout (Goyal et al., 2017, https://arxiv.org/abs/1612.00837;
      files from https://visualqa.org/download.html), with reproducible image-level sub-sampling.

Example:
    >>> examples = load_source("easy-vqa", "test")
    >>> len(examples), examples[0].answers[:2]
    (9673, ['triangle', 'triangle'])
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqakit.data.example import ANSWER_TYPES, Example, question_type_of

NUM_HUMAN_ANSWERS = 10  # VQA v2 collects 10 answers per question; single-answer sources repeat theirs.


def _first(ids: Any, n: int = 5) -> str:
    ids = sorted(ids)
    more = f", ... (+{len(ids) - n} more)" if len(ids) > n else ""
    return "[" + ", ".join(str(i) for i in ids[:n]) + more + "]"


# ---------------------------------------------------------------------------------------------------
# easy-VQA
# ---------------------------------------------------------------------------------------------------

EASY_VQA_SPLITS = ("train", "test")


def easy_vqa_data_dir() -> Path:
    """The ``data/`` folder inside the installed ``easy_vqa`` package."""
    try:
        import easy_vqa
    except ImportError as e:
        raise RuntimeError("the 'easy-vqa' source needs the easy-vqa package: pip install easy-vqa") from e
    return Path(easy_vqa.__file__).resolve().parent / "data"


def load_easy_vqa(split: str) -> list[Example]:
    """Load one split of easy-VQA from the installed ``easy_vqa`` package.

    ``questions.json`` holds ``[question, answer, image_id]`` triples; images are
    ``images/{image_id}.png``. ``question_id`` is the question's index in that file, so it is stable.

    Args:
        split: ``train`` or ``test``.
    """
    if split not in EASY_VQA_SPLITS:
        raise ValueError(f"easy-vqa split {split!r} not found; available splits = {list(EASY_VQA_SPLITS)}")
    split_dir = easy_vqa_data_dir() / split
    questions_path = split_dir / "questions.json"
    rows = _read_json(questions_path, what="a list of [question, answer, image_id]")
    if not isinstance(rows, list):
        raise ValueError(f"{questions_path}: expected a list of [question, answer, image_id], got {type(rows).__name__}")
    examples = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3):
            raise ValueError(f"{questions_path}: entry {i} is {row!r}, expected [question, answer, image_id]")
        question, answer, image_id = row
        examples.append(
            Example(
                image=str(split_dir / "images" / f"{int(image_id)}.png"),
                question=question,
                question_id=i,
                image_id=int(image_id),
                answers=[answer] * NUM_HUMAN_ANSWERS,
                answer_type="yes/no" if answer in ("yes", "no") else "other",
                question_type=question_type_of(question),
            )
        )
    return examples


# ---------------------------------------------------------------------------------------------------
# VQA v2, official layout
# ---------------------------------------------------------------------------------------------------

# split name -> (data subtype of the questions/annotations files, data subtype of the COCO image folder)
VQA_V2_SPLITS = {
    "train2014": ("train2014", "train2014"),
    "val2014": ("val2014", "val2014"),
    "test2015": ("test2015", "test2015"),
    "test-dev2015": ("test-dev2015", "test2015"),  # test-dev is a subset of the test2015 images
}
VQA_V2_SPLIT_ALIASES = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}

_QUESTION_KEYS = ("image_id", "question", "question_id")
_ANNOTATION_KEYS = ("question_id", "image_id", "question_type", "answer_type", "answers")
_QUESTIONS_CONTENT = '{"questions": [{"image_id", "question", "question_id"}, ...]}'
_ANNOTATIONS_CONTENT = (
    '{"annotations": [{"question_id", "image_id", "question_type", "answer_type", '
    '"multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}, ...]}, ...]}'
)


def vqa_v2_split_name(split: str) -> str:
    """Normalise ``train``/``val``/``test``/``test-dev`` (or the full ``val2014``-style names).

    >>> vqa_v2_split_name("val"), vqa_v2_split_name("train2014")
    ('val2014', 'train2014')
    """
    name = VQA_V2_SPLIT_ALIASES.get(split, split)
    if name not in VQA_V2_SPLITS:
        valid = list(VQA_V2_SPLIT_ALIASES) + list(VQA_V2_SPLITS)
        raise ValueError(f"vqa-v2 split {split!r} not found; available splits = {valid}")
    return name


def vqa_v2_paths(root: str | Path, split: str, image_dir: str | Path | None = None) -> tuple[Path, Path, Path]:
    """``(questions_file, annotations_file, image_dir)`` of a split in the official layout."""
    name = vqa_v2_split_name(split)
    subtype, image_subtype = VQA_V2_SPLITS[name]
    root = Path(root).expanduser().resolve()
    questions = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    annotations = root / f"v2_mscoco_{subtype}_annotations.json"
    images = root / image_dir if image_dir is not None else root / image_subtype  # absolute image_dir wins
    return questions, annotations, images


def vqa_v2_image_path(image_dir: Path, split: str, image_id: int) -> Path:
    """``{image_dir}/COCO_{subtype}_{image_id:012d}.jpg``, the COCO file name of an image."""
    _, image_subtype = VQA_V2_SPLITS[vqa_v2_split_name(split)]
    return image_dir / f"COCO_{image_subtype}_{image_id:012d}.jpg"


@dataclass
class VQAv2Split:
    """A loaded VQA v2 split, possibly restricted to a random sample of its images.

    Args:
        examples: the questions of the kept images, in question-file order.
        split: the full split name, e.g. ``train2014``.
        sampled_image_ids: the kept image ids, sorted (all images when ``fraction == 1``).
        fraction: the fraction of images kept.
        seed: the seed of the image sample.
        num_images_total: how many images the split has before sampling.
    """

    examples: list[Example]
    split: str
    sampled_image_ids: list[int]
    fraction: float = 1.0
    seed: int = 0
    num_images_total: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def image_paths(self) -> dict[int, str]:
        """image id -> path, e.g. for ``vqakit.data.images.scan_images``."""
        return {ex.image_id: ex.image for ex in self.examples}

    def save_sample(self, path: str | Path) -> Path:
        """Write the sampled image ids, fraction and seed as JSON; reuse with ``load_vqa_v2(..., sample_file=path)``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "dataset": "vqa-v2",
            "split": self.split,
            "fraction": self.fraction,
            "seed": self.seed,
            "num_images_total": self.num_images_total,
            "num_images": len(self.sampled_image_ids),
            "image_ids": self.sampled_image_ids,
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        return path


def sample_image_ids(image_ids, fraction: float, seed: int) -> list[int]:
    """A seeded ``fraction`` of the distinct image ids, sorted; the same for the same ids in any order.

    >>> sample_image_ids([5, 1, 3, 2], 0.5, seed=0) == sample_image_ids([1, 2, 3, 5], 0.5, seed=0)
    True
    """
    ids = sorted(set(image_ids))
    k = max(1, round(fraction * len(ids)))
    return sorted(random.Random(seed).sample(ids, k))


def load_vqa_v2(
    root: str | Path,
    split: str,
    train_image_fraction: float = 1.0,
    seed: int = 0,
    image_dir: str | Path | None = None,
    sample_file: str | Path | None = None,
) -> VQAv2Split:
    """Load a VQA v2 split from the official file layout.

    Expected under ``root`` (``{s}`` = ``train2014``, ``val2014``, ``test2015`` or ``test-dev2015``)::

        v2_OpenEnded_mscoco_{s}_questions.json
        v2_mscoco_{s}_annotations.json          (train and val only; test has no answers)
        {s}/COCO_{s}_{image_id:012d}.jpg        (test-dev images live in test2015/)

    Args:
        root: folder holding the JSON files (and, by default, the image folders).
        split: ``train``, ``val``, ``test``, ``test-dev``, or the full names ``train2014`` etc.
        train_image_fraction: keep this fraction of the split's IMAGES, in ``(0, 1]``, with all their
            questions. The sample is drawn with ``random.Random(seed)`` from the sorted unique image
            ids, so it does not depend on the order of the file.
        seed: seed of the sample.
        image_dir: image folder, relative to ``root`` or absolute; default ``{root}/{s}``.
        sample_file: a JSON written by ``VQAv2Split.save_sample``; reuses exactly its image ids
            (then ``train_image_fraction`` and ``seed`` must be left at their defaults or match it).

    Raises:
        FileNotFoundError: a JSON file is missing (the message names the exact path expected).
        ValueError: malformed JSON, a missing key, questions and annotations that disagree,
            a bad fraction, or a sample file that does not match this split.

    Example:
        >>> data = load_vqa_v2("/data/vqa", "train", train_image_fraction=0.1, seed=0)  # doctest: +SKIP
        >>> len(data.sampled_image_ids), len(data)  # doctest: +SKIP
        (8278, 44375)
    """
    name = vqa_v2_split_name(split)
    if not 0.0 < train_image_fraction <= 1.0:
        raise ValueError(f"train_image_fraction={train_image_fraction} must be in (0, 1]")
    questions_path, annotations_path, images = vqa_v2_paths(root, name, image_dir)
    has_answers = not name.startswith("test")

    questions = _read_vqa_v2_questions(questions_path)
    all_image_ids = sorted({q["image_id"] for q in questions})
    if sample_file is not None:
        sampled, recorded_fraction, recorded_seed = _read_sample(Path(sample_file), name, all_image_ids)
        asked = (train_image_fraction, seed)
        if asked != (1.0, 0) and asked != (recorded_fraction, recorded_seed):
            raise ValueError(
                f"sample_file {sample_file} records fraction={recorded_fraction}, seed={recorded_seed} but "
                f"train_image_fraction={train_image_fraction}, seed={seed} were passed; pass only sample_file"
            )
        fraction, seed = recorded_fraction, recorded_seed
    elif train_image_fraction < 1.0:
        sampled = sample_image_ids(all_image_ids, train_image_fraction, seed)
        fraction = train_image_fraction
    else:
        sampled, fraction = all_image_ids, 1.0
    keep = set(sampled)
    annotations: dict[int, dict] = {}
    if has_answers:  # streamed: only the kept images' annotations are held in memory
        annotations, image_of = _read_vqa_v2_annotations(annotations_path, keep)
        _check_agreement(questions, image_of, questions_path, annotations_path)

    examples = []
    for q in questions:
        if q["image_id"] not in keep:
            continue
        ann = annotations.get(q["question_id"])
        examples.append(
            Example(
                image=str(vqa_v2_image_path(images, name, q["image_id"])),
                question=q["question"],
                question_id=q["question_id"],
                image_id=q["image_id"],
                answers=ann["answers"] if ann else [],
                answer_type=ann["answer_type"] if ann else "other",
                question_type=ann["question_type"] if ann else "",
            )
        )
    return VQAv2Split(examples, name, list(sampled), fraction, seed, num_images_total=len(all_image_ids))


def open_binary(path: Path):
    """``path`` opened for reading bytes; a ``.gz`` file is decompressed on the fly."""
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"expected file not found: {path}. It should contain {what}.")
    try:
        with open_binary(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:  # OSError: a corrupt .gz
        raise ValueError(f"{path} is not valid JSON ({e}); it should contain {what}. Re-download or re-extract it.") from e


def _read_records(path: Path, top_key: str, keys: tuple[str, ...], content: str, label: str) -> Iterator[dict]:
    """The records under ``top_key``, validated one by one.

    Streamed with ijson (https://github.com/ICRAR/ijson), so a 330 MB annotation file is never held as one
    Python object tree; when streaming yields nothing or fails, the file is parsed whole to name the error.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"VQA v2 {label} file not found: {path}. It should contain {content}, as in the official zip from "
            "https://visualqa.org/download.html. Check root= and split=."
        )
    try:
        import ijson
    except ImportError:  # a declared dependency; without it the file is parsed whole
        ijson = None
    n = 0
    if ijson is not None:
        try:
            with open_binary(path) as f:
                for n, r in enumerate(ijson.items(f, f"{top_key}.item", use_float=True), 1):
                    _check_record(path, top_key, n - 1, r, keys, content)
                    yield r
        except (ijson.JSONError, OSError):  # OSError: a corrupt .gz
            n = 0  # malformed JSON: the full parse below raises and says where
        if n:
            return
    data = _read_json(path, what=content)  # nothing streamed: empty, malformed, or not the expected shape
    if not isinstance(data, dict) or top_key not in data:
        found = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: missing key {top_key!r} at the top level (found {found}); expected {content}")
    records = data[top_key]
    if not isinstance(records, list):
        raise ValueError(f"{path}: key {top_key!r} should hold a list, got {type(records).__name__}")
    for i, r in enumerate(records):
        _check_record(path, top_key, i, r, keys, content)
        yield r


def _check_record(path: Path, top_key: str, i: int, r: Any, keys: tuple[str, ...], content: str) -> None:
    if not isinstance(r, dict):
        raise ValueError(f"{path}: {top_key}[{i}] should be an object, got {type(r).__name__}")
    for key in keys:
        if key not in r:
            qid = r.get("question_id", "?")
            raise ValueError(f"{path}: {top_key}[{i}] (question_id={qid}) is missing key {key!r}; expected {content}")
    for key in ("image_id", "question_id"):
        if isinstance(r[key], bool) or not isinstance(r[key], int):
            raise ValueError(f"{path}: {top_key}[{i}] key {key!r} should be an integer, got {r[key]!r}")


def _read_vqa_v2_questions(path: Path) -> list[dict]:
    questions = list(_read_records(path, "questions", _QUESTION_KEYS, _QUESTIONS_CONTENT, "questions"))
    counts = Counter(q["question_id"] for q in questions)
    duplicates = [qid for qid, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"{path}: {len(duplicates)} question ids appear more than once, e.g. {_first(duplicates)}")
    return questions


def _read_vqa_v2_annotations(
    path: Path, keep_image_ids: set[int] | None = None
) -> tuple[dict[int, dict], dict[int, int]]:
    """Validate every annotation; return those of ``keep_image_ids`` (all when None), compacted to the fields
    the loader uses, and ``question_id -> image_id`` of all of them (to check them against the questions)."""
    records = _read_records(path, "annotations", _ANNOTATION_KEYS, _ANNOTATIONS_CONTENT, "annotations")
    annotations: dict[int, dict] = {}
    image_of: dict[int, int] = {}
    for i, ann in enumerate(records):
        qid = ann["question_id"]
        if qid in image_of:
            raise ValueError(f"{path}: question_id={qid} is annotated twice (annotations[{i}])")
        if ann["answer_type"] not in ANSWER_TYPES:
            raise ValueError(
                f"{path}: annotations[{i}] (question_id={qid}) key 'answer_type' is {ann['answer_type']!r}, "
                f"expected one of {ANSWER_TYPES}"
            )
        answers = ann["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, dict) and "answer" in a for a in answers):
            raise ValueError(
                f"{path}: annotations[{i}] (question_id={qid}) key 'answers' should be a list of "
                '{"answer", "answer_confidence", "answer_id"} objects, each with key \'answer\''
            )
        if len(answers) > NUM_HUMAN_ANSWERS:
            raise ValueError(f"{path}: annotations[{i}] (question_id={qid}) has {len(answers)} answers, at most 10")
        image_of[qid] = ann["image_id"]
        if keep_image_ids is None or ann["image_id"] in keep_image_ids:
            annotations[qid] = {"answers": [a["answer"] for a in answers], "answer_type": ann["answer_type"],
                                "question_type": ann["question_type"]}
    return annotations, image_of


def _check_agreement(questions: list[dict], image_of: dict[int, int], q_path: Path, a_path: Path) -> None:
    qids = {q["question_id"] for q in questions}
    unanswered = qids - image_of.keys()
    orphans = image_of.keys() - qids
    if unanswered or orphans:
        raise ValueError(
            f"{q_path.name} and {a_path.name} disagree: {len(unanswered)} questions have no annotation "
            f"(question ids {_first(unanswered)}), {len(orphans)} annotations have no question "
            f"(question ids {_first(orphans)}). Are both files from the same split and download?"
        )
    mismatched = [q["question_id"] for q in questions if image_of[q["question_id"]] != q["image_id"]]
    if mismatched:
        raise ValueError(
            f"{q_path.name} and {a_path.name} disagree on the image_id of {len(mismatched)} questions "
            f"(question ids {_first(mismatched)})"
        )


def _read_sample(path: Path, split: str, all_image_ids: list[int]) -> tuple[list[int], float, int]:
    sample = _read_json(path, what="a sample written by VQAv2Split.save_sample")
    for key in ("split", "fraction", "seed", "image_ids"):
        if not isinstance(sample, dict) or key not in sample:
            raise ValueError(f"sample file {path} is missing key {key!r}; write it with VQAv2Split.save_sample")
    if sample["split"] != split:
        raise ValueError(f"sample file {path} was recorded for split {sample['split']!r}, not {split!r}")
    ids = sorted(int(i) for i in sample["image_ids"])
    unknown = set(ids) - set(all_image_ids)
    if unknown:
        raise ValueError(
            f"sample file {path} lists {len(unknown)} image ids that are not in split {split!r} "
            f"(e.g. {_first(unknown)}); it was recorded on different data"
        )
    return ids, float(sample["fraction"]), int(sample["seed"])


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def _vqa_v2_examples(split: str, root: str | Path | None = None, **kwargs: Any) -> list[Example]:
    if root is None:
        raise ValueError("dataset 'vqa-v2' needs root=<folder with the official VQA v2 JSON files>")
    return load_vqa_v2(root, split, **kwargs).examples


def _lazy(module: str, name: str) -> Callable[..., list[Example]]:
    """A loader defined in another vqakit.data module (imported on first use: no import cycle)."""

    def load(split: str, **kwargs: Any) -> list[Example]:
        import importlib

        return getattr(importlib.import_module(module), name)(split, **kwargs)

    load.__name__ = name
    return load


SOURCES: dict[str, Callable[..., list[Example]]] = {
    "easy-vqa": load_easy_vqa,
    "vqa-v2": _vqa_v2_examples,
    "shapes-rel": _lazy("vqakit.data.procedural", "load_shapes_rel"),  # our procedural relational benchmark
    "jsonl": _lazy("vqakit.data.formats", "load_jsonl"),  # {root}/{split}.jsonl
    "csv": _lazy("vqakit.data.formats", "load_csv"),  # {root}/{split}.csv
    "image-json": _lazy("vqakit.data.formats", "load_image_json"),  # {root}/{split}/*.json, one per image
    "hf": _lazy("vqakit.data.hf", "load_hf"),  # Hugging Face datasets: a save_to_disk directory or a Hub id
}


def load_source(name: str, split: str, **kwargs: Any) -> list[Example]:
    """Load ``split`` of the dataset registered as ``name`` in ``SOURCES``.

    >>> load_source("coco-qa", "train")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: Dataset 'coco-qa' not found; available datasets = ['csv', 'easy-vqa', 'hf', 'image-json', ...]
    """
    if name not in SOURCES:
        raise ValueError(f"Dataset {name!r} not found; available datasets = {sorted(SOURCES)}")
    return SOURCES[name](split, **kwargs)
