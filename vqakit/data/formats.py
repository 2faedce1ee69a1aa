"""Dataset formats users already have, and converters between them.

Formats (every one is a registered source: ``--data.dataset jsonl --data.root DIR``):

- ``jsonl``: ``{root}/{split}.jsonl``, one question per line::

      {"image": "images/1.jpg", "question": "What color is the cube?", "answers": ["red", "Red", ...]}

  ``answer`` (one string, repeated 10 times) may replace ``answers``; ``question_id``, ``image_id``,
  ``answer_type`` and ``question_type`` are optional (derived when missing).
- ``csv``: ``{root}/{split}.csv`` with the same columns; ``answers`` is a JSON list (``["red", "Red"]``).
- ``image-json``: a directory ``{root}/{split}/`` of JSON files, one per image, each naming the image and
  its question/answer pairs (the per-image format of seed 001)::

      {"path": "images/1.jpg", "questions": [{"question": "...", "answer": "Blue"}, ...]}

  The list form ``[{"path": ...}, {"questions": [...]}]`` is read too.
- ``vqa-v2``: the official layout (see ``vqakit.data.sources.load_vqa_v2``).

Relative image paths are resolved against ``root``. ``convert`` reads any registered source and writes
any of these formats; ``build_mini_vqa`` makes a compact VQA v2 subset (seed 003).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from vqakit.data.example import ANSWER_TYPES, Example, question_type_of

WRITE_FORMATS = ("jsonl", "csv", "image-json", "vqa-v2")
_OPTIONAL = ("question_id", "image_id", "answer_type", "question_type")
_CSV_COLUMNS = ("image", "question", "answer", "answers", "question_id", "image_id", "answer_type", "question_type")


# ---------------------------------------------------------------------------------------------------
# Reading


def infer_answer_type(answers: list[str]) -> str:
    """``yes/no`` / ``number`` / ``other`` from the majority normalised answer (as VQA v2 assigns it).

    >>> infer_answer_type(["Yes", "yes", "no"]), infer_answer_type(["two", "2"]), infer_answer_type(["red"])
    ('yes/no', 'number', 'other')
    """
    from vqakit.data.answers import majority_answer

    if not answers:
        return "other"
    a = majority_answer(answers)
    if a in ("yes", "no"):
        return "yes/no"
    return "number" if a.isdigit() else "other"


def _record_to_example(rec: dict, where: str, root: Path, index: int, image_ids: dict[str, int]) -> Example:
    images = rec.get("image")
    if isinstance(images, list):  # several images for one question (the chat-VLM family reads them)
        if not images or not all(isinstance(i, str) and i.strip() for i in images):
            raise ValueError(f"{where}: field 'image' is a list but not of non-empty paths (got {images!r})")
    for key in ("image", "question"):
        if key == "image" and isinstance(images, list):
            continue
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise ValueError(f"{where}: missing or empty field {key!r} (got {rec.get(key)!r}); each record needs "
                             "'image' (a path, or a list of paths), 'question' and 'answer' or 'answers'")
    if rec.get("answers") not in (None, ""):
        answers = rec["answers"]
        if isinstance(answers, str):
            try:
                answers = json.loads(answers)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: field 'answers' should be a JSON list of strings, got {answers!r}") from e
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answers' should be a list of strings, got {answers!r}")
    elif rec.get("answer") not in (None, ""):
        answers = [str(rec["answer"])] * 10  # one answer: repeated, so the official metric reads it as unanimous
    else:
        answers = []
    def resolve(path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else root / p)

    image = [resolve(i) for i in images] if isinstance(images, list) else resolve(images)
    image_id = rec.get("image_id")
    image_id = int(image_id) if image_id not in (None, "") else image_ids.setdefault(str(image), len(image_ids))
    qid = rec.get("question_id")
    answer_type = rec.get("answer_type") or infer_answer_type(answers)
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"{where}: answer_type={answer_type!r} is not one of {ANSWER_TYPES}")
    try:
        return Example(
            image=image,
            question=rec["question"],
            question_id=int(qid) if qid not in (None, "") else index,
            image_id=image_id,
            answers=answers,
            answer_type=answer_type,
            question_type=rec.get("question_type") or question_type_of(rec["question"]),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _check_unique_ids(examples: list[Example], path: Path) -> list[Example]:
    dup = [q for q, n in Counter(e.question_id for e in examples).items() if n > 1]
    if dup:
        raise ValueError(f"{path}: question_id {dup[0]} appears {Counter(e.question_id for e in examples)[dup[0]]} "
                         "times; question ids must be unique (or leave them out)")
    return examples


def _split_file(root: str | Path | None, split: str, suffix: str, fmt: str) -> tuple[Path, Path]:
    if root is None:
        raise ValueError(f"dataset {fmt!r} needs root=<folder with {{split}}{suffix}>")
    root = Path(root).expanduser().resolve()
    path = root / f"{split}{suffix}"
    if not path.exists():
        found = sorted(p.name for p in root.glob(f"*{suffix}"))[:10] if root.is_dir() else "root does not exist"
        raise FileNotFoundError(f"{fmt} split {split!r}: expected {path} (found {found})")
    return root, path


def load_jsonl(split: str, root: str | Path | None = None) -> list[Example]:
    """Examples of ``{root}/{split}.jsonl``."""
    root, path = _split_file(root, split, ".jsonl", "jsonl")
    examples, image_ids = [], {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{line_no} should be a JSON object, got {type(rec).__name__}")
            examples.append(_record_to_example(rec, f"{path}:{line_no}", root, len(examples), image_ids))
    return _check_unique_ids(examples, path)


def load_csv(split: str, root: str | Path | None = None) -> list[Example]:
    """Examples of ``{root}/{split}.csv`` (header row with at least ``image``, ``question``, ``answer(s)``)."""
    root, path = _split_file(root, split, ".csv", "csv")
    examples, image_ids = [], {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = set(reader.fieldnames or [])
        missing = sorted({"image", "question"} - header)
        missing += [] if {"answer", "answers"} & header else ["answer or answers"]
        if missing:
            raise ValueError(f"{path}: header {reader.fieldnames} lacks column(s) {missing}")
        for row_no, row in enumerate(reader, 2):
            examples.append(_record_to_example(row, f"{path}:{row_no}", root, len(examples), image_ids))
    return _check_unique_ids(examples, path)


def load_image_json(split: str, root: str | Path | None = None) -> list[Example]:
    """Examples of a directory ``{root}/{split}/`` holding one JSON file per image (files in name order)."""
    root, folder = _split_file(root, split, "", "image-json")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"image-json split {split!r}: no *.json files in {folder}")
    examples, image_ids = [], {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
        if isinstance(data, list):  # seed 001's form: [{"path": ...}, {"questions": [...]}]
            merged = {}
            for part in data:
                if not isinstance(part, dict):
                    raise ValueError(f"{path}: list entries should be objects, got {part!r}")
                merged.update(part)
            data = merged
        if not isinstance(data, dict) or not isinstance(data.get("path"), (str, list)):
            raise ValueError(f"{path}: missing key 'path' (the image file, or a list of them); expected "
                             '{"path": "images/1.jpg", "questions": [{"question": ..., "answer": ...}]}')
        qas = data.get("questions")
        if not isinstance(qas, list):
            raise ValueError(f"{path}: key 'questions' should be a list of {{question, answer}} objects, got {qas!r}")
        for k, qa in enumerate(qas):
            if not isinstance(qa, dict):
                raise ValueError(f"{path}: questions[{k}] should be an object, got {qa!r}")
            rec = {"image": data["path"], "image_id": data.get("image_id"), **qa}
            examples.append(_record_to_example(rec, f"{path} questions[{k}]", root, len(examples), image_ids))
    return _check_unique_ids(examples, folder)


# ---------------------------------------------------------------------------------------------------
# Writing


def _place_images(examples: list[Example], dst: Path, copy_images: bool) -> dict[str, str]:
    """image path -> path to write (relative to ``dst`` when copied into ``dst/images``)."""
    out = {}
    for e in examples:
        if e.image in out:
            continue
        if copy_images:
            src = Path(e.image)
            rel = Path("images") / f"{e.image_id}{src.suffix.lower() or '.jpg'}"
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (dst / rel).exists():
                shutil.copyfile(src, dst / rel)
            out[e.image] = rel.as_posix()
        else:  # referenced in place: relative when under ``dst`` (the folder can move), else absolute
            path, base = Path(e.image).resolve(), dst.resolve()
            out[e.image] = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
    return out


def _record(e: Example, image: str) -> dict:
    from vqakit.data.answers import majority_answer

    rec = {"image": image, "question": e.question, "answer": majority_answer(e.answers) if e.answers else "",
           "answers": e.answers}
    rec.update({k: getattr(e, k) for k in _OPTIONAL})
    return rec


def write_jsonl(examples: list[Example], root: str | Path, split: str, copy_images: bool = True) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = _place_images(examples, root, copy_images)
    path = root / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(_record(e, images[e.image])) + "\n")
    return path


def write_csv(examples: list[Example], root: str | Path, split: str, copy_images: bool = True) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = _place_images(examples, root, copy_images)
    path = root / f"{split}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        for e in examples:
            rec = _record(e, images[e.image])
            rec["answers"] = json.dumps(rec["answers"])
            writer.writerow(rec)
    return path


def write_image_json(examples: list[Example], root: str | Path, split: str, copy_images: bool = True) -> Path:
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images = _place_images(examples, root, copy_images)
    per_image: dict[int, list[Example]] = {}
    for e in examples:
        per_image.setdefault(e.image_id, []).append(e)
    for image_id, exs in per_image.items():
        qas = [{k: v for k, v in _record(e, "").items() if k not in ("image", "image_id")} for e in exs]
        doc = {"path": images[exs[0].image], "image_id": image_id, "questions": qas}
        (folder / f"{image_id:012d}.json").write_text(json.dumps(doc, indent=1) + "\n")
    return folder


def write_vqa_v2_json(questions_path: Path, annotations_path: Path, split: str, questions: list[dict],
                      annotations: list[dict] | None, description: str = "written by vqakit") -> None:
    """The two official JSON files of a split (``annotations=None`` for test splits, as in the download)."""
    from vqakit.data.sources import VQA_V2_SPLITS

    subtype = VQA_V2_SPLITS[split][0]
    info = {"description": description, "url": "http://visualqa.org", "version": "2.0", "year": 2017,
            "contributor": "vqakit", "date_created": "2017-04-26 17:07:36"}
    license_ = {"url": "http://creativecommons.org/licenses/by/4.0/",
                "name": "Creative Commons Attribution 4.0 International License"}
    common = {"info": info, "license": license_, "data_subtype": subtype, "data_type": "mscoco"}
    questions_path.parent.mkdir(parents=True, exist_ok=True)
    questions_path.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    if annotations is not None:
        annotations_path.write_text(json.dumps({**common, "annotations": annotations}))


def write_vqa_v2(examples: list[Example], root: str | Path, split: str, copy_images: bool = True) -> Path:
    """Write ``examples`` as split ``split`` (``train``/``val``/... or ``train2014``...) in the official layout.

    Images become ``{split}/COCO_{split}_{image_id:012d}.jpg``: JPEG files are copied byte for byte,
    other formats are re-encoded as JPEG (quality 95). ``copy_images`` must be true (the layout fixes
    the image paths). Question ids must be unique integers (they are).
    """
    from PIL import Image

    from vqakit.data.answers import majority_answer
    from vqakit.data.sources import vqa_v2_image_path, vqa_v2_paths, vqa_v2_split_name

    if not copy_images:
        raise ValueError("the official VQA v2 layout fixes the image paths: convert with copy_images=True")
    name = vqa_v2_split_name(split)
    questions_path, annotations_path, image_dir = vqa_v2_paths(root, name)
    image_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for e in examples:
        if e.image_id in written:
            if written[e.image_id] != e.image:
                raise ValueError(f"image_id {e.image_id} names two files ({written[e.image_id]}, {e.image}); "
                                 "image ids must be unique per image")
            continue
        written[e.image_id] = e.image
        dst = vqa_v2_image_path(image_dir, name, e.image_id)
        with Image.open(e.image) as im:
            if im.format == "JPEG":
                shutil.copyfile(e.image, dst)
            else:
                im.convert("RGB").save(dst, "JPEG", quality=95)
    questions = [{"image_id": e.image_id, "question": e.question, "question_id": e.question_id} for e in examples]
    annotations = None
    if not name.startswith("test"):
        annotations = []
        for e in examples:
            if len(e.answers) == 0:
                raise ValueError(f"question {e.question_id} has no answers; only test splits may lack them")
            annotations.append({
                "question_type": e.question_type, "multiple_choice_answer": majority_answer(e.answers),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(e.answers)],
                "image_id": e.image_id, "answer_type": e.answer_type, "question_id": e.question_id,
            })  # fmt: skip
    write_vqa_v2_json(questions_path, annotations_path, name, questions, annotations)
    return Path(root)


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "image-json": write_image_json, "vqa-v2": write_vqa_v2}


def write_examples(examples: list[Example], fmt: str, root: str | Path, split: str, copy_images: bool = True) -> Path:
    if fmt not in WRITERS:
        raise ValueError(f"format {fmt!r} cannot be written; writable formats = {list(WRITERS)}")
    return WRITERS[fmt](examples, root, split, copy_images)


# ---------------------------------------------------------------------------------------------------
# Mini VQA v2 (seed 003)


def filter_for_mini(examples: Iterable[Example], max_answer_words: int = 3, min_agreement: float = 0.5,
                    answer_types: Iterable[str] = ANSWER_TYPES) -> tuple[list[Example], Counter]:
    """Keep questions whose majority answer is short and agreed on.

    Args:
        max_answer_words: drop questions whose normalised majority answer has more words than this.
        min_agreement: drop ambiguous questions: fewer than this fraction of the human answers equal
            the majority answer (after normalisation).
        answer_types: keep only these answer types.

    Returns the kept examples and a counter of why the others were dropped.
    """
    from vqakit.data.answers import majority_answer, normalize_answer

    keep_types = set(answer_types)
    kept, dropped = [], Counter()
    for e in examples:
        if not e.answers:
            dropped["no answers"] += 1
            continue
        major = majority_answer(e.answers)
        agreement = sum(normalize_answer(a) == major for a in e.answers) / len(e.answers)
        if e.answer_type not in keep_types:
            dropped["answer type"] += 1
        elif len(major.split()) > max_answer_words:
            dropped["long answer"] += 1
        elif agreement < min_agreement:
            dropped["ambiguous"] += 1
        else:
            kept.append(e)
    return kept, dropped


def build_mini_vqa(
    root: str | Path,
    out_dir: str | Path,
    split: str = "train",
    num_images: int = 1000,
    seed: int = 0,
    max_answer_words: int = 3,
    min_agreement: float = 0.5,
    image_size: int = 224,
    formats: Iterable[str] = ("jsonl", "csv"),
) -> dict:
    """A compact VQA v2 subset: ``num_images`` seeded images of ``split``, short unambiguous answers only,
    images shrunk to at most ``image_size`` px on the long side (JPEG), written as ``{split}.jsonl`` /
    ``{split}.csv`` (``answer`` = the majority answer, the target; ``answers`` = all human answers).
    Returns (and writes as ``mini_vqa.json``) the statistics."""
    from PIL import Image

    from vqakit.data.images import load_image
    from vqakit.data.sources import load_vqa_v2

    full = load_vqa_v2(root, split)
    fraction = min(1.0, num_images / max(1, full.num_images_total))
    sampled = load_vqa_v2(root, split, train_image_fraction=fraction, seed=seed) if fraction < 1 else full
    kept, dropped = filter_for_mini(sampled.examples, max_answer_words, min_agreement)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    small = []
    for e in kept:
        dst = out / "images" / f"{e.image_id}.jpg"
        if not dst.exists():
            im = load_image(e.image)
            im.thumbnail((image_size, image_size), Image.Resampling.BICUBIC)
            im.save(dst, "JPEG", quality=90)
        small.append(Example(**{**e.to_dict(), "image": str(dst)}))
    short = "train" if split.startswith("train") else "val" if split.startswith("val") else split
    for fmt in formats:
        if fmt not in ("jsonl", "csv", "image-json"):
            raise ValueError(f"mini VQA formats are jsonl, csv, image-json; got {fmt!r}")
        write_examples(small, fmt, out, short, copy_images=False)
    stats = {
        "source": str(root), "split": full.split, "seed": seed, "images": len({e.image_id for e in small}),
        "questions": len(small), "questions_before_filters": len(sampled.examples), "dropped": dict(dropped),
        "max_answer_words": max_answer_words, "min_agreement": min_agreement, "image_size": image_size,
        "answer_types": dict(Counter(e.answer_type for e in small)),
    }
    (out / "mini_vqa.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats

