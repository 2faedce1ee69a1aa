"""The Hugging Face `datasets` source on small Datasets built here and saved with save_to_disk (nothing downloaded)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from vqakit.data.config import DataConfig, load_split  # noqa: E402
from vqakit.data.hf import load_hf, resolve_columns  # noqa: E402


def _png(color) -> Image.Image:
    return Image.new("RGB", (20, 12), color)


def _vqav2_like(n: int = 4) -> "datasets.Dataset":
    """The column layout of the HF VQAv2 datasets: answers as {answer, answer_confidence, answer_id} dicts."""
    colors = ["red", "blue", "red", "green"][:n]
    rows = {
        "question_id": [100 + i for i in range(n)],
        "image_id": [7, 7, 8, 9][:n],
        "question": [f"What color is it {i}?" for i in range(n)],
        "image": [_png(c) for c in colors],
        "answers": [[{"answer": c, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)] for c in colors],
        "multiple_choice_answer": colors,
        "answer_type": ["other"] * n,
        "question_type": ["what color is"] * n,
    }
    features = datasets.Features({
        "question_id": datasets.Value("int64"), "image_id": datasets.Value("int64"),
        "question": datasets.Value("string"), "image": datasets.Image(),
        "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                     "answer_id": datasets.Value("int64")}],
        "multiple_choice_answer": datasets.Value("string"), "answer_type": datasets.Value("string"),
        "question_type": datasets.Value("string"),
    })  # fmt: skip
    return datasets.Dataset.from_dict(rows, features=features)


def test_a_dataset_dict_with_pil_images_loads_by_split(tmp_path):
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": _vqav2_like(4), "validation": _vqav2_like(2)}).save_to_disk(str(root))
    examples = load_hf("train", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert [e.question_id for e in examples] == [100, 101, 102, 103]
    assert [e.image_id for e in examples] == [7, 7, 8, 9]
    assert examples[0].answers == ["red"] * 10 and examples[0].question_type == "what color is"
    # images: written once by the SHA-1 of their bytes, so the same picture gets the same file (and cache key)
    assert examples[0].image == examples[2].image != examples[1].image
    data = Path(examples[1].image).read_bytes()
    assert Path(examples[1].image).stem == hashlib.sha1(data).hexdigest() and examples[1].image.endswith(".png")
    assert Image.open(examples[1].image).getpixel((0, 0)) == (0, 0, 255)
    assert len(load_hf("validation", root=str(root), cache_dir=str(tmp_path / "cache"))) == 2
    with pytest.raises(ValueError, match=r"hf split 'test' not found in .*splits = \['train', 'validation'\]"):
        load_hf("test", root=str(root))


def test_column_mapping_paths_and_a_single_answer(tmp_path):
    root = tmp_path / "hf"
    (root / "pics").mkdir(parents=True)
    for i, c in enumerate(["red", "blue"]):
        _png(c).save(root / "pics" / f"{i}.png")
    ds = datasets.Dataset.from_dict({"img": ["pics/0.png", "pics/1.png", "pics/0.png"],
                                     "q": ["Is it red?", "How many?", "Is it blue?"], "label": ["yes", "2", "no"]})
    ds.save_to_disk(str(root))
    data = DataConfig(dataset="hf", root=str(root), train_split="train",
                      source_options={"image": "img", "question": "q", "answer": "label"})
    examples = load_split(data, "train")
    assert [e.image for e in examples] == [str(root.resolve() / "pics" / f"{i}.png") for i in (0, 1, 0)]
    assert [e.image_id for e in examples] == [0, 1, 0] and [e.question_id for e in examples] == [0, 1, 2]
    assert examples[1].answers == ["2"] * 10
    assert [e.answer_type for e in examples] == ["yes/no", "number", "yes/no"]
    assert examples[0].question_type == "is it red"
    with pytest.raises(ValueError, match=r"holds a single Dataset, which is split 'train'"):
        load_split(data, "test")


def test_answers_as_a_list_of_strings_and_the_cli_trains_on_it(tmp_path, tiny_model_args):
    from vqakit.cli import main

    root = tmp_path / "hf"
    n = 12
    ds = datasets.Dataset.from_dict({
        "image": [_png(["red", "blue", "green"][i % 3]) for i in range(n)],
        "question": ["What color is the picture?"] * n,
        "answers": [[["red", "blue", "green"][i % 3]] * 9 + ["gray"] for i in range(n)],
    }, features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                   "answers": datasets.Sequence(datasets.Value("string"))}))  # fmt: skip
    datasets.DatasetDict({"train": ds, "test": ds.select(range(6))}).save_to_disk(str(root))
    main(["train", *tiny_model_args, "--data.dataset", "hf", "--data.root", str(root), "--data.val_fraction", "0",
          "--data.cache_dir", str(tmp_path / "cache"), "--train.out_dir", str(tmp_path / "run"),
          "--train.epochs", "1", "--train.batch_size", "8", "--train.progress", "false"])
    metrics = json.loads((tmp_path / "run" / "checkpoint" / "eval-hf-test" / "metrics.json").read_text())
    assert metrics["num_questions"] == 6 and metrics["dataset"] == "hf"
    assert any((tmp_path / "cache" / "datasets" / "hf-images").rglob("*.png"))


def test_bad_mappings_and_options_are_clear_errors(tmp_path):
    root = tmp_path / "hf"
    datasets.Dataset.from_dict({"picture": ["a.png"], "text": ["q?"], "ans": ["x"], "n": [3]}).save_to_disk(str(root))
    with pytest.raises(ValueError, match=r"no column for \['question', 'answers or answer'\] \(columns = \['pic"):
        load_hf("train", root=str(root))
    with pytest.raises(ValueError, match=r"question='nope': no such column; columns = \['picture', 'text', 'ans', "):
        load_hf("train", root=str(root), question="nope", answer="ans")
    with pytest.raises(ValueError, match=r"\['colour'\], not options of the hf source"):
        load_split(DataConfig(dataset="hf", root=str(root), source_options={"colour": "x"}), "train")
    with pytest.raises(ValueError, match="answers should be a list of strings"):
        load_hf("train", root=str(root), question="text", answers="n")
    assert resolve_columns(["image", "question", "answers", "multiple_choice_answer"], {})["answers"] == "answers"


def test_a_hub_id_without_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises((RuntimeError, ValueError), match="nope/not-a-dataset"):
        load_hf("train", root="nope/not-a-dataset")
