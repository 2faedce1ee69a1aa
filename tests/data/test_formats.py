"""Tests for vqakit.data.formats: JSONL / CSV / per-image JSON sources, converters, the mini VQA v2 builder."""

import json
from pathlib import Path

import pytest

from vqakit.cli import main
from vqakit.data.answers import majority_answer
from vqakit.data.formats import build_mini_vqa, filter_for_mini, load_image_json, write_examples
from vqakit.data.images import load_image
from fixtures.vqa_v2 import write_vqa_v2_fixture
from vqakit.data.sources import load_source, load_vqa_v2


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_vqa_v2_fixture(tmp_path_factory.mktemp("vqa"), "train", num_images=6, questions_per_image=3)


def _key(e):
    return (e.question_id, e.image_id, e.question, e.answers, e.answer_type, e.question_type)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "image-json", "vqa-v2"])
def test_round_trip(fixture_root, tmp_path, fmt):
    examples = load_vqa_v2(fixture_root, "train").examples
    write_examples(examples, fmt, tmp_path, "train" if fmt != "vqa-v2" else "train2014")
    back = load_source(fmt, "train", root=tmp_path)
    assert sorted(map(_key, back)) == sorted(map(_key, examples))
    by_qid = {e.question_id: e for e in examples}
    for e in back:  # the images travelled with the questions
        assert Path(e.image).is_file() and Path(e.image).is_relative_to(tmp_path)
        assert load_image(e.image).size == load_image(by_qid[e.question_id].image).size


def test_convert_chain_via_cli(fixture_root, tmp_path):
    """vqa-v2 -> csv -> image-json -> vqa-v2 keeps every question and answer."""
    common = ["--data.train_split", "train", "--splits", "train"]
    main(["convert", "--data.dataset", "vqa-v2", "--data.root", str(fixture_root), "--to", "csv",
          "--out_dir", str(tmp_path / "csv"), *common])
    main(["convert", "--data.dataset", "csv", "--data.root", str(tmp_path / "csv"), "--to", "image-json",
          "--out_dir", str(tmp_path / "ij"), *common])
    main(["convert", "--data.dataset", "image-json", "--data.root", str(tmp_path / "ij"), "--to", "vqa-v2",
          "--out_dir", str(tmp_path / "v2"), *common])
    assert (tmp_path / "v2" / "v2_mscoco_train2014_annotations.json").is_file()
    assert sorted(map(_key, load_vqa_v2(tmp_path / "v2", "train").examples)) == sorted(
        map(_key, load_vqa_v2(fixture_root, "train").examples))


def test_seed001_per_image_json(tmp_path):
    """The list form of seed 001, one answer per question, types derived."""
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "blue").save(tmp_path / "images" / "a.jpg")
    (tmp_path / "train").mkdir()
    doc = [{"path": "images/a.jpg"}, {"questions": [{"question": "What color is the sky?", "answer": "Blue"},
                                                    {"question": "How many people are there?", "answer": "Two"},
                                                    {"question": "Is it day?", "answer": "yes"}]}]
    (tmp_path / "train" / "a.json").write_text(json.dumps(doc))
    ex = load_image_json("train", root=tmp_path)
    assert [e.answer_type for e in ex] == ["other", "number", "yes/no"]
    assert ex[0].answers == ["Blue"] * 10 and ex[0].image == str(tmp_path / "images" / "a.jpg")
    assert len({e.image_id for e in ex}) == 1 and [e.question_id for e in ex] == [0, 1, 2]
    assert ex[1].question_type == "how many people"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_source("jsonl", "train", root=tmp_path)
    (tmp_path / "train.jsonl").write_text('{"image": "x.jpg", "question": "q?", "answer": "a"}\n{"image": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing or empty field 'question'"):
        load_source("jsonl", "train", root=tmp_path)
    (tmp_path / "train.csv").write_text("image,question\nx.jpg,q?\n")
    with pytest.raises(ValueError, match="lacks column.*answer or answers"):
        load_source("csv", "train", root=tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "1.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match=r"1.json: missing key 'path'"):
        load_source("image-json", "train", root=tmp_path)
    bad_type = '{"image": "x.jpg", "question": "q?", "answer": "a", "answer_type": "color"}\n'
    (tmp_path / "test.jsonl").write_text(bad_type)
    with pytest.raises(ValueError, match="answer_type='color'"):
        load_source("jsonl", "test", root=tmp_path)


def test_train_reads_jsonl(fixture_root, tmp_path):
    """A JSONL dataset goes through the same split loading as the built-in sources."""
    from vqakit.data.config import DataConfig, load_split

    write_examples(load_vqa_v2(fixture_root, "train").examples, "jsonl", tmp_path, "train")
    cfg = DataConfig(dataset="jsonl", root=str(tmp_path), train_image_fraction=0.5)
    assert len({e.image_id for e in load_split(cfg, "train")}) == 3


def test_mini_vqa(fixture_root, tmp_path):
    examples = load_vqa_v2(fixture_root, "train").examples
    examples[0].answers = ["a very long answer here"] * 10
    examples[1].answers = ["red", "blue", "green", "yellow", "1", "2", "3", "4", "5", "6"]
    kept, dropped = filter_for_mini(examples, max_answer_words=3, min_agreement=0.5)
    assert dropped == {"long answer": 1, "ambiguous": 1} and len(kept) == len(examples) - 2

    stats = build_mini_vqa(fixture_root, tmp_path / "mini", "train", num_images=4, image_size=32)
    assert stats["images"] == 4 and stats["questions"] == 12
    mini = load_source("csv", "train", root=tmp_path / "mini")
    assert len(mini) == 12 and max(load_image(mini[0].image).size) == 32
    rows = [json.loads(line) for line in (tmp_path / "mini" / "train.jsonl").read_text().splitlines()]
    assert all(not Path(r["image"]).is_absolute() for r in rows)  # the folder can be moved
    assert all(r["answer"] == majority_answer(r["answers"]) and len(r["answers"]) == 10 for r in rows)
