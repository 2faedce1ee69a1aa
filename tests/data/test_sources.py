"""Tests for vqakit.data.sources: easy-VQA counts, the VQA v2 loader on its fixture, sampling, errors, registry."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from vqakit.data.example import ANSWER_TYPES
from vqakit.data.images import load_image
from vqakit.data.sources import (
    SOURCES,
    VQAv2Split,
    load_easy_vqa,
    load_source,
    load_vqa_v2,
)

from fixtures.vqa_v2 import write_vqa_v2_fixture

# ------------------------------------------------------------------------------------------- easy-VQA

# Counts from easy_vqa/data/README.md.
EASY_VQA_COUNTS = {"train": (38_575, 4_000, 28_407), "test": (9_673, 1_000, 7_136)}


@pytest.fixture(scope="module")
def easy_vqa():
    return {split: load_easy_vqa(split) for split in ("train", "test")}


@pytest.mark.parametrize("split", ["train", "test"])
def test_easy_vqa_counts(easy_vqa, split):
    examples = easy_vqa[split]
    n_questions, n_images, n_yes_no = EASY_VQA_COUNTS[split]
    assert len(examples) == n_questions
    assert len({ex.image_id for ex in examples}) == n_images
    assert sum(ex.answer_type == "yes/no" for ex in examples) == n_yes_no
    assert [ex.question_id for ex in examples] == list(range(n_questions))  # running index: stable


def test_easy_vqa_answers_and_types(easy_vqa):
    examples = easy_vqa["train"] + easy_vqa["test"]
    answers = {ex.answers[0] for ex in examples}
    assert len(answers) == 13 and {"yes", "no", "circle", "red"} <= answers
    assert {ex.answer_type for ex in examples} == {"yes/no", "other"}
    for ex in examples[:500]:
        assert ex.answers == [ex.answers[0]] * 10
        assert (ex.answer_type == "yes/no") == (ex.answers[0] in ("yes", "no"))
        assert ex.question_type == " ".join(ex.question.lower().rstrip("?").split()[:3])


def test_easy_vqa_images_exist(easy_vqa):
    first = easy_vqa["train"][0]
    assert first.question == "what is the blue shape?" and first.answers[0] == "rectangle" and first.image_id == 0
    assert Path(first.image).name == "0.png" and Path(first.image).parts[-3] == "train"
    for split in ("train", "test"):
        images = {ex.image for ex in easy_vqa[split]}
        assert all(Path(p).is_file() for p in sorted(images)[:50])
    assert load_image(first.image).size == (64, 64)


def test_easy_vqa_bad_split():
    with pytest.raises(ValueError, match=r"split 'val' not found; available splits = \['train', 'test'\]"):
        load_easy_vqa("val")


# ---------------------------------------------------------------------------------------------- VQA v2


@pytest.fixture(scope="module")
def vqa_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_v2")
    write_vqa_v2_fixture(root, "train", num_images=20, questions_per_image=3, seed=0)
    write_vqa_v2_fixture(root, "val", num_images=4, questions_per_image=6, seed=0)
    write_vqa_v2_fixture(root, "test", num_images=3, questions_per_image=2, seed=0)
    return root


def copy_split(src: Path, dst: Path, split: str = "train") -> Path:
    """Copy the JSON files of a split (not the images) so a test can damage them."""
    dst.mkdir(exist_ok=True)
    for name in (f"v2_OpenEnded_mscoco_{split}2014_questions.json", f"v2_mscoco_{split}2014_annotations.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_fixture_has_official_layout(vqa_root):
    assert (vqa_root / "v2_OpenEnded_mscoco_train2014_questions.json").is_file()
    assert (vqa_root / "v2_mscoco_train2014_annotations.json").is_file()
    assert (vqa_root / "v2_OpenEnded_mscoco_test2015_questions.json").is_file()
    assert not (vqa_root / "v2_mscoco_test2015_annotations.json").exists()  # test has no answers
    questions = json.loads((vqa_root / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    annotations = json.loads((vqa_root / "v2_mscoco_train2014_annotations.json").read_text())
    for data in (questions, annotations):
        assert {"info", "license", "data_subtype", "data_type"} <= set(data) and data["data_subtype"] == "train2014"
    assert questions["task_type"] == "Open-Ended"
    ann = annotations["annotations"][0]
    assert set(ann) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"}
    assert set(ann["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
    assert ann["question_id"] // 1000 == ann["image_id"]
    jpgs = sorted((vqa_root / "train2014").glob("COCO_train2014_*.jpg"))
    assert len(jpgs) == 20 and len(jpgs[0].stem.split("_")[-1]) == 12


def test_vqa_v2_fixture_loads(vqa_root):
    data = load_vqa_v2(vqa_root, "train")
    assert isinstance(data, VQAv2Split) and data.split == "train2014" and data.fraction == 1.0
    assert len(data) == 60 and len(data.sampled_image_ids) == 20 == data.num_images_total
    assert len({ex.question_id for ex in data.examples}) == 60
    for ex in data.examples:
        assert len(ex.answers) == 10 and ex.answer_type in ANSWER_TYPES and ex.question_type
        assert Path(ex.image) == vqa_root / "train2014" / f"COCO_train2014_{ex.image_id:012d}.jpg"
        majority, votes = Counter(a.strip().lower() for a in ex.answers).most_common(1)[0]
        assert votes >= 5
    assert any(a != a.strip().lower() for ex in data.examples for a in ex.answers)  # realistic noise
    assert load_image(data.examples[0].image).size == (120, 80)
    assert load_vqa_v2(vqa_root, "train2014").examples == data.examples  # full split names work too


def test_vqa_v2_answers_match_the_drawing(vqa_root):
    # The fixture draws one shape per third of the width; the background colour is a corner pixel.
    backgrounds = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
    data = load_vqa_v2(vqa_root, "val")
    checked = 0
    for ex in data.examples:
        if ex.question == "What color is the background?":
            majority = Counter(a.strip().lower() for a in ex.answers).most_common(1)[0][0]
            corner = load_image(ex.image).getpixel((1, 1))
            assert all(abs(c - e) < 12 for c, e in zip(corner, backgrounds[majority]))
            checked += 1
    assert checked == 4  # val has all 6 questions per image


def test_vqa_v2_test_split_has_no_answers(vqa_root):
    data = load_vqa_v2(vqa_root, "test")
    assert data.split == "test2015" and len(data) == 6
    assert all(ex.answers == [] for ex in data.examples)
    assert Path(data.examples[0].image).parent == vqa_root / "test2015"


def test_vqa_v2_image_dir_override(vqa_root, tmp_path):
    data = load_vqa_v2(vqa_root, "val", image_dir=tmp_path / "elsewhere")
    assert all(Path(ex.image).parent == tmp_path / "elsewhere" for ex in data.examples)
    data = load_vqa_v2(vqa_root, "val", image_dir="images/val")
    assert Path(data.examples[0].image).parent == vqa_root / "images" / "val"


def test_fraction_keeps_whole_images(vqa_root):
    data = load_vqa_v2(vqa_root, "train", train_image_fraction=0.25, seed=3)
    assert len(data.sampled_image_ids) == 5 and data.sampled_image_ids == sorted(data.sampled_image_ids)
    per_image = Counter(ex.image_id for ex in data.examples)
    assert sorted(per_image) == data.sampled_image_ids
    assert set(per_image.values()) == {3}  # every question of a kept image is kept
    assert data.fraction == 0.25 and data.seed == 3 and data.num_images_total == 20


def test_same_seed_same_sample_different_seed_different_sample(vqa_root):
    a = load_vqa_v2(vqa_root, "train", train_image_fraction=0.5, seed=0)
    b = load_vqa_v2(vqa_root, "train", train_image_fraction=0.5, seed=0)
    c = load_vqa_v2(vqa_root, "train", train_image_fraction=0.5, seed=1)
    assert a.sampled_image_ids == b.sampled_image_ids and a.examples == b.examples
    assert a.sampled_image_ids != c.sampled_image_ids


def test_sample_does_not_depend_on_file_order(vqa_root, tmp_path):
    root = copy_split(vqa_root, tmp_path / "shuffled")
    for name, key in (("v2_OpenEnded_mscoco_train2014_questions.json", "questions"),
                      ("v2_mscoco_train2014_annotations.json", "annotations")):
        data = json.loads((root / name).read_text())
        random.Random(42).shuffle(data[key])
        (root / name).write_text(json.dumps(data))
    original = load_vqa_v2(vqa_root, "train", train_image_fraction=0.3, seed=7)
    shuffled = load_vqa_v2(root, "train", train_image_fraction=0.3, seed=7)
    assert original.sampled_image_ids == shuffled.sampled_image_ids
    assert {ex.question_id for ex in original.examples} == {ex.question_id for ex in shuffled.examples}


def test_sample_round_trip(vqa_root, tmp_path):
    sampled = load_vqa_v2(vqa_root, "train", train_image_fraction=0.4, seed=11)
    path = sampled.save_sample(tmp_path / "runs" / "sample.json")
    record = json.loads(path.read_text())
    assert record["image_ids"] == sampled.sampled_image_ids and record["fraction"] == 0.4 and record["seed"] == 11

    again = load_vqa_v2(vqa_root, "train", sample_file=path)
    assert again.sampled_image_ids == sampled.sampled_image_ids and again.examples == sampled.examples
    assert (again.fraction, again.seed) == (0.4, 11)
    assert load_vqa_v2(vqa_root, "train", 0.4, 11, sample_file=path).examples == sampled.examples

    with pytest.raises(ValueError, match="pass only sample_file"):
        load_vqa_v2(vqa_root, "train", train_image_fraction=0.5, sample_file=path)
    with pytest.raises(ValueError, match="recorded for split 'train2014', not 'val2014'"):
        load_vqa_v2(vqa_root, "val", sample_file=path)

    record["image_ids"] = record["image_ids"][:-1] + [999_999_999]
    (tmp_path / "bad_sample.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"1 image ids that are not in split 'train2014' \(e.g. \[999999999\]\)"):
        load_vqa_v2(vqa_root, "train", sample_file=tmp_path / "bad_sample.json")


def test_bad_fraction(vqa_root):
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_image_fraction"):
            load_vqa_v2(vqa_root, "train", train_image_fraction=fraction)


def test_missing_file_names_the_path(tmp_path, vqa_root):
    with pytest.raises(FileNotFoundError) as e:
        load_vqa_v2(tmp_path, "val")
    expected = str(tmp_path.resolve() / "v2_OpenEnded_mscoco_val2014_questions.json")
    assert expected in str(e.value) and '"questions"' in str(e.value)

    root = copy_split(vqa_root, tmp_path / "no_annotations")
    (root / "v2_mscoco_train2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_vqa_v2(root, "train")
    assert str(root.resolve() / "v2_mscoco_train2014_annotations.json") in str(e.value)
    assert '"annotations"' in str(e.value)


def test_malformed_annotation_names_the_key(vqa_root, tmp_path):
    root = copy_split(vqa_root, tmp_path / "broken")
    path = root / "v2_mscoco_train2014_annotations.json"
    data = json.loads(path.read_text())
    del data["annotations"][4]["answers"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[4\] .* missing key 'answers'") as e:
        load_vqa_v2(root, "train")
    assert str(path.resolve()) in str(e.value)

    del data["annotations"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing key 'annotations'"):
        load_vqa_v2(root, "train")


def test_malformed_json_names_the_file(vqa_root, tmp_path):
    root = copy_split(vqa_root, tmp_path / "cut")
    path = root / "v2_OpenEnded_mscoco_train2014_questions.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_vqa_v2(root, "train")
    assert str(path.resolve()) in str(e.value)


def test_questions_and_annotations_disagree(vqa_root, tmp_path):
    root = copy_split(vqa_root, tmp_path / "disagree")
    path = root / "v2_mscoco_train2014_annotations.json"
    data = json.loads(path.read_text())
    dropped = [data["annotations"].pop(0)["question_id"], data["annotations"].pop(0)["question_id"]]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disagree: 2 questions have no annotation") as e:
        load_vqa_v2(root, "train")
    assert str(min(dropped)) in str(e.value)


def test_bad_split_names():
    with pytest.raises(ValueError, match="available splits"):
        load_vqa_v2("/nowhere", "validation")
    with pytest.raises(ValueError, match="questions_per_image"):
        write_vqa_v2_fixture("/nowhere", questions_per_image=7)


# -------------------------------------------------------------------------------------------- registry


def test_registry(vqa_root):
    assert set(SOURCES) == {"easy-vqa", "vqa-v2", "shapes-rel", "jsonl", "csv", "image-json", "hf"}
    assert len(load_source("easy-vqa", "test")) == 9_673
    examples = load_source("vqa-v2", "train", root=vqa_root, train_image_fraction=0.5, seed=0)
    assert examples == load_vqa_v2(vqa_root, "train", 0.5, 0).examples
    with pytest.raises(ValueError, match="needs root="):
        load_source("vqa-v2", "train")
    with pytest.raises(ValueError, match=r"Dataset 'coco-qa' not found; available datasets = \['csv', 'easy-vqa', "):
        load_source("coco-qa", "train")


def test_annotations_streamed_and_malformed_json_named(vqa_root, tmp_path):
    """The streamed reader gives the same examples as a whole-file parse; a truncated file is named."""
    import shutil

    import vqakit.data.sources as sources

    full = load_vqa_v2(vqa_root, "train").examples
    kept, image_of = sources._read_vqa_v2_annotations(vqa_root / "v2_mscoco_train2014_annotations.json", {-1})
    assert kept == {} and len(image_of) == len(full)  # every annotation checked, none of an unsampled image kept
    root = tmp_path / "trunc"
    shutil.copytree(vqa_root, root)
    path = root / "v2_mscoco_train2014_annotations.json"
    path.write_text(path.read_text()[:-500])
    with pytest.raises(ValueError, match=r"v2_mscoco_train2014_annotations.json is not valid JSON"):
        load_vqa_v2(root, "train")
