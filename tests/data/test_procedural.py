"""Tests for the shapes-rel procedural benchmark: determinism, official layout, answers that are true."""

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from vqakit.data.answers import majority_answer, normalize_answer
from vqakit.data.procedural import (
    COLORS,
    FAMILIES,
    SceneObject,
    ShapesRelConfig,
    ask,
    draw_scene,
    human_answers,
    load_shapes_rel,
    random_scene,
    write_shapes_rel,
)
from vqakit.data.sources import load_source, load_vqa_v2
from vqakit.eval.vqa_accuracy import vqa_accuracy


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_rel(tmp_path_factory.mktemp("shapes"), num_train_images=30, num_val_images=10,
                            questions_per_image=5)


def test_deterministic_per_seed(shapes, tmp_path):
    again = write_shapes_rel(tmp_path / "a", num_train_images=30, num_val_images=10, questions_per_image=5)
    other = write_shapes_rel(tmp_path / "b", num_train_images=30, num_val_images=10, questions_per_image=5,
                             seed=1)
    assert _digest(again) == _digest(shapes)
    assert _digest(other) != _digest(shapes)


def test_prefix_stable(shapes, tmp_path):
    """A bigger dataset with the same seed starts with the same images and questions."""
    small = load_vqa_v2(write_shapes_rel(tmp_path, num_train_images=12, num_val_images=1, questions_per_image=5),
                        "train").examples
    big = load_vqa_v2(shapes, "train").examples
    assert [(e.question, e.answers) for e in small] == [(e.question, e.answers) for e in big[: len(small)]]


def test_official_layout_and_families(shapes):
    names = sorted(p.name for p in shapes.iterdir())
    assert "v2_OpenEnded_mscoco_train2014_questions.json" in names and "v2_mscoco_val2014_annotations.json" in names
    assert len(list((shapes / "train2014").glob("COCO_train2014_*.jpg"))) == 30
    train, val = load_source("shapes-rel", "train", root=shapes), load_source("shapes-rel", "val", root=shapes)
    assert len(train) == 150 and len(val) == 50
    assert not {e.image_id for e in train} & {e.image_id for e in val}
    assert Counter(e.question_type for e in train) == {f: 30 for f in FAMILIES}  # balanced families
    assert {e.answer_type for e in train} == {"yes/no", "number", "other"}
    ann = json.loads((shapes / "v2_mscoco_train2014_annotations.json").read_text())["annotations"][0]
    assert {"question_template", "multiple_choice_answer"} <= set(ann)


def test_answers_are_true_of_the_scene(shapes):
    """Re-derive answers from the written scene graphs for a few templates."""
    written = json.loads((shapes / "shapes_rel_train2014_scenes.json").read_text())
    scenes = {s["image_id"]: s["objects"] for s in written}
    checked = 0
    for e in load_vqa_v2(shapes, "train").examples:
        objs = scenes[e.image_id]
        answer = majority_answer(e.answers)
        assert len({o["color"] for o in objs}) == len(objs)  # colours unique: "the red object" is one object
        if e.question == "How many objects are there?":
            assert answer == str(len(objs)); checked += 1
        elif e.question.startswith("What shape is the object closest to the "):
            ref = next(o for o in objs if o["color"] == e.question.split("the ")[-1].split()[0])
            d = lambda o: (o["x"] - ref["x"]) ** 2 + (o["y"] - ref["y"]) ** 2  # noqa: E731
            assert answer == min((o for o in objs if o is not ref), key=d)["shape"]; checked += 1
        elif e.question.startswith("What shape is the ") and e.question.split()[4] in COLORS:
            color = e.question.split()[4]
            assert answer == next(o["shape"] for o in objs if o["color"] == color); checked += 1
    assert checked >= 5


def test_human_answers_majority_and_accuracy():
    rng = random.Random(0)
    for answer, atype in [("yes", "yes/no"), ("3", "number"), ("0", "number"), ("circle", "other"),
                          ("purple", "other"), ("large", "other")]:
        for _ in range(200):
            raw = human_answers(answer, atype, rng)
            assert len(raw) == 10
            assert majority_answer(raw) == answer
            assert sum(normalize_answer(a) == answer for a in raw) >= 5
            assert vqa_accuracy(answer, raw) == 1.0
    noisy = [human_answers("red", "other", rng) for _ in range(5)]
    assert any(a != "red" for raw in noisy for a in raw)  # noise is there


def test_relational_questions_are_unambiguous():
    rng = random.Random(1)
    for _ in range(300):
        objs = random_scene(rng)
        assert 2 <= len(objs) <= 5
        q = ask(objs, "relational", rng)
        if q.template == "closest_shape":
            ref = next(o for o in objs if o.color == q.question.split("the ")[-1].split()[0])
            ds = sorted(ref.dist(o) for o in objs if o is not ref)
            assert len(ds) == 1 or ds[1] - ds[0] >= 6.0


def test_draw_scene_colours():
    obj = SceneObject("square", "red", "large", 64, 64, 16)
    im = draw_scene([obj], random.Random(0))
    assert im.size == (128, 128) and im.getpixel((64, 64)) == COLORS["red"]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="questions_per_image"):
        ShapesRelConfig(questions_per_image=11)
    with pytest.raises(FileNotFoundError, match="shapes_rel.json"):
        load_shapes_rel("train", root=tmp_path)
    with pytest.raises(ValueError, match="available splits"):
        load_shapes_rel("test", root=tmp_path)


def test_generate_cli_then_train_source(tmp_path, capsys):
    from vqakit.cli import main

    main(["generate", "--out_dir", str(tmp_path / "g"), "--num_train_images", "6", "--num_val_images", "2",
          "--questions_per_image", "4", "--seed", "3"])
    assert "8 images, 32 questions" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "g" / "shapes_rel.json").read_text())
    assert cfg["seed"] == 3 and cfg["questions_per_image"] == 4
    assert len(load_source("shapes-rel", "val", root=tmp_path / "g")) == 8


def test_source_options_generate_a_sized_dataset_under_the_cache(tmp_path, monkeypatch):
    from vqakit.data.config import DataConfig, load_split

    monkeypatch.setenv("VQAKIT_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(dataset="shapes-rel", source_options={"num_train_images": 7, "num_val_images": 3,
                                                           "questions_per_image": 2})
    train = load_split(cfg, "train")
    assert len({e.image_id for e in train}) == 7 and len(train) == 14
    assert len(load_split(cfg, "val")) == 6
    with pytest.raises(ValueError, match=r"\['colours'\], not settings of shapes-rel"):
        load_split(DataConfig(dataset="shapes-rel", source_options={"colours": 3}), "train")
    with pytest.raises(ValueError, match="only shapes-rel and hf take options"):
        load_split(DataConfig(dataset="easy-vqa", source_options={"num_train_images": 3}), "train")
    with pytest.raises(ValueError, match="only apply when the dataset is generated"):
        load_shapes_rel("train", root=tmp_path, num_train_images=3)
