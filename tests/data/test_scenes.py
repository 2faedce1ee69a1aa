"""The transfer suite's procedural datasets: deterministic, in the official layout, answers consistent with the
scene graphs, every family present."""

import json
from collections import Counter

import pytest

from vqakit.data.answers import majority_answer
from vqakit.data.scenes import FAMILIES, SUITE, SceneSpec, family_counts, write_scenes
from vqakit.data.sources import load_vqa_v2


@pytest.mark.parametrize("name", sorted(SUITE))
def test_suite_dataset_loads_as_vqa_v2_with_every_family(tmp_path, name):
    spec = SUITE[name].scaled(num_train_images=30, num_val_images=5, questions_per_image=10)
    root = write_scenes(tmp_path / name, spec)
    train = load_vqa_v2(root, "train2014").examples
    assert len(train) == 300
    assert set(family_counts(root)) == set(FAMILIES)
    from PIL import Image

    with Image.open(train[0].image) as im:
        assert im.size == (spec.width, spec.height)
    for e in train:
        assert len(e.answers) == 10


def test_generation_is_deterministic(tmp_path):
    spec = SUITE["transfer-dots64"].scaled(num_train_images=6, num_val_images=2)
    a, b = write_scenes(tmp_path / "a", spec), write_scenes(tmp_path / "b", spec)
    for f in ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"):
        assert (a / f).read_text() == (b / f).read_text()
    assert (a / "train2014/COCO_train2014_000000000001.jpg").read_bytes() == \
        (b / "train2014/COCO_train2014_000000000001.jpg").read_bytes()


def test_position_answers_follow_the_scene_graph(tmp_path):
    spec = SUITE["transfer-wide320"].scaled(num_train_images=60, num_val_images=2, families={"position": 1.0})
    root = write_scenes(tmp_path, spec)
    scenes = {s["image_id"]: s["objects"] for s in json.loads((root / "scenes_train2014.json").read_text())}
    checked = Counter()
    for e in load_vqa_v2(root, "train2014").examples:
        q, answer = e.question.lower(), majority_answer(e.answers)
        color = next(c for c in spec.palette if f" {c} " in q)
        obj = next(o for o in scenes[e.image_id] if o["color"] == color)
        left = obj["x"] < spec.width / 2
        if "left or on the right" in q or "which side" in q:
            assert answer == ("left" if left else "right"), e.question
        elif " left " in q or " right " in q:
            assert answer == ("yes" if (" left " in q) == left else "no"), e.question
        else:
            top = obj["y"] < spec.height / 2
            asks_top = " top " in q or " upper " in q
            assert answer == ("yes" if asks_top == top else "no"), e.question
        checked[e.question_type] += 1
    assert checked["position"] == 600


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="colours cannot colour"):
        SceneSpec(name="x", width=64, height=64, palette={"red": (255, 0, 0), "blue": (0, 0, 255)}, max_objects=3)
    with pytest.raises(ValueError, match="shapes"):
        SceneSpec(name="x", width=64, height=64, palette={"a": (1, 1, 1), "b": (2, 2, 2)}, shapes=("hexagon",))
