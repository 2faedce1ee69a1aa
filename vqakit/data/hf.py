"""Hugging Face ``datasets`` as a source: ``--data.dataset hf --data.root <dir or hub id>``.

``root`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(https://huggingface.co/docs/datasets/process#save), or, for users with a network, a Hub dataset id passed to
``datasets.load_dataset``. A ``DatasetDict`` gives the splits by name; a lone ``Dataset`` is the ``train`` split.

Columns are found by their common names or mapped with ``--data.source_options`` (our field -> the column)::

    --data.source_options '{"image": "img", "question": "q", "answers": "answers"}'

- ``image``: a ``datasets.Image`` column (PIL images / encoded bytes) or file paths (relative to ``image_root``,
  default the dataset directory). Encoded images are written once, by the SHA-1 of their bytes, under
  ``<cache_dir>/datasets/hf-images/``, so the feature cache (which keys images by content) sees a stable identity.
- ``answers``: a list of strings or of ``{"answer": ...}`` dicts (the HF VQAv2 layout); or ``answer``, one string
  (repeated 10 times, as the other single-answer sources do).
- optional: ``question_id`` (default: the row index), ``image_id`` (default: one id per distinct image),
  ``answer_type`` (default: inferred from the answers), ``question_type`` (default: the first words).

Other options: ``name`` (the Hub configuration), ``revision`` and ``image_root``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from vqakit.data.example import ANSWER_TYPES, Example, question_type_of

COLUMN_CANDIDATES = {
    "image": ("image", "img", "image_path", "image_file", "file_name", "path", "picture"),
    "question": ("question", "q", "query", "question_text"),
    "answers": ("answers", "human_answers", "all_answers"),
    "answer": ("answer", "multiple_choice_answer", "label_text"),
    "question_id": ("question_id", "qid"),
    "image_id": ("image_id",),
    "answer_type": ("answer_type",),
    "question_type": ("question_type",),
}
OTHER_OPTIONS = ("name", "revision", "image_root", "cache_dir")
HF_OPTIONS = tuple(COLUMN_CANDIDATES) + OTHER_OPTIONS
_NUM_ANSWERS = 10


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("--data.dataset hf needs the datasets package: pip install datasets "
                           "(or pip install 'vqakit[hf]')") from e
    return datasets


def _open(root: str, split: str, name: str | None, revision: str | None):
    """(the split's Dataset, the directory relative image paths resolve against)."""
    datasets = _datasets()
    path = Path(root).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--data.root={root}: not a directory written by save_to_disk")
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"--data.root={root} is not a directory written by Dataset.save_to_disk or "
                             f"DatasetDict.save_to_disk ({e})") from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"hf split {split!r} not found in {root}; available splits = {sorted(loaded)}")
            return loaded[split], path.resolve()
        if split != "train":
            raise ValueError(f"hf split {split!r} not found: {root} holds a single Dataset, which is split 'train'; "
                             "save a DatasetDict for more splits (or use --data.val_fraction for validation)")
        return loaded, path.resolve()
    try:
        ds = datasets.load_dataset(root, name=name, split=split, revision=revision)
    except ValueError as e:  # an unknown split name
        raise ValueError(f"hf dataset {root!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - no network, unknown id, auth: one clear line instead of a deep trace
        raise RuntimeError(f"--data.root={root!r} is neither a local save_to_disk directory nor a loadable Hub "
                           f"dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return ds, Path.cwd()


def resolve_columns(column_names: list[str], options: dict) -> dict[str, str]:
    """Our field -> the dataset's column, from ``options`` or the common names.

    >>> resolve_columns(["img", "question", "answers"], {"image": "img"})
    {'image': 'img', 'question': 'question', 'answers': 'answers'}
    """
    columns: dict[str, str] = {}
    for key, candidates in COLUMN_CANDIDATES.items():
        if key in options:
            if options[key] not in column_names:
                raise ValueError(f"--data.source_options {key}={options[key]!r}: no such column; "
                                 f"columns = {column_names}")
            columns[key] = options[key]
        else:
            found = next((c for c in candidates if c in column_names and c not in columns.values()), None)
            if found is not None:
                columns[key] = found
    if "answer" in options and "answers" not in options:
        columns.pop("answers", None)  # an explicit single-answer column wins over a detected list
    missing = [k for k in ("image", "question") if k not in columns]
    if "answers" not in columns and "answer" not in columns:
        missing.append("answers or answer")
    if missing:
        raise ValueError(f"hf dataset: no column for {missing} (columns = {column_names}); map them with "
                         "--data.source_options '{\"image\": \"<col>\", \"question\": \"<col>\", "
                         "\"answers\": \"<col>\"}'")
    return columns


def _answers(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value] * _NUM_ANSWERS
    if isinstance(value, dict) and isinstance(value.get("answer"), list):  # a Sequence of dicts reads as columns
        value = value["answer"]
    if isinstance(value, list):
        out = [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in value]
        if all(isinstance(a, str) for a in out):
            return out
    raise ValueError(f"{where}: answers should be a list of strings, a list of {{\"answer\": str}} or one string, "
                     f"got {str(value)[:80]}")


def _image_file(value: Any, image_root: Path, store: Path, where: str) -> str:
    """A path to the image: the given path, or the encoded bytes written once under ``store`` by their SHA-1."""
    if isinstance(value, str):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else image_root / p)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if not value.get("bytes"):
            return _image_file(value["path"], image_root, store, where)
        data = value["bytes"]
    elif hasattr(value, "save"):  # a decoded PIL image (a column that is not a datasets.Image feature)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise ValueError(f"{where}: the image should be a datasets.Image value or a path, got {type(value).__name__}")
    digest = hashlib.sha1(data).hexdigest()
    target = store / digest[:2] / f"{digest}{_suffix(data)}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)  # atomic: a concurrent reader never sees half a file
    return str(target)


def _suffix(data: bytes) -> str:
    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format or ""
    except Exception:  # noqa: BLE001 - a broken image keeps its bytes; scan_images reports it
        return ".img"
    return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}.get(fmt, f".{fmt.lower()}")


def load_hf(split: str, root: str | Path | None = None, **options: Any) -> list[Example]:
    """Examples of one split of a Hugging Face dataset (see the module docstring for ``options``)."""
    if root is None:
        raise ValueError("dataset 'hf' needs root=<directory written by save_to_disk, or a Hub dataset id>")
    unknown = sorted(set(options) - set(HF_OPTIONS))
    if unknown:
        raise ValueError(f"--data.source_options has {unknown}, not options of the hf source; "
                         f"known = {list(HF_OPTIONS)}")
    datasets = _datasets()
    ds, base = _open(str(root), split, options.get("name"), options.get("revision"))
    columns = resolve_columns(list(ds.column_names), options)
    image_root = Path(options["image_root"]).expanduser() if options.get("image_root") else base
    from vqakit.data.cache import default_cache_dir

    store = (Path(options["cache_dir"]) if options.get("cache_dir") else default_cache_dir()) / "datasets" / "hf-images"
    ds = ds.select_columns(sorted(set(columns.values())))
    if isinstance(ds.features[columns["image"]], datasets.Image):
        ds = ds.cast_column(columns["image"], datasets.Image(decode=False))  # bytes + path, no decoding here
    from vqakit.data.formats import infer_answer_type

    examples, image_ids, seen = [], {}, {}
    for i, row in enumerate(ds):
        where = f"hf dataset {root} split {split!r} row {i}"
        question = row[columns["question"]]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: empty or non-string question {question!r}")
        answers = _answers(row[columns["answers"]] if "answers" in columns else row[columns["answer"]], where)
        image = _image_file(row[columns["image"]], image_root, store, where)
        qid = int(row[columns["question_id"]]) if "question_id" in columns else i
        if qid in seen:
            raise ValueError(f"{where}: question_id {qid} also on row {seen[qid]}; question ids must be unique")
        seen[qid] = i
        if "image_id" in columns:
            image_id = int(row[columns["image_id"]])
        else:  # one id per distinct image file (encoded images: per distinct content)
            image_id = image_ids.setdefault(image, len(image_ids))
        answer_type = row[columns["answer_type"]] if "answer_type" in columns else infer_answer_type(answers)
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"{where}: answer_type {answer_type!r} is not one of {ANSWER_TYPES}")
        question_type = row[columns["question_type"]] if "question_type" in columns else question_type_of(question)
        try:
            examples.append(Example(image=image, question=question, question_id=qid, image_id=image_id,
                                    answers=answers, answer_type=answer_type, question_type=question_type))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    if not examples:
        raise ValueError(f"hf dataset {root} split {split!r} is empty")
    return examples
