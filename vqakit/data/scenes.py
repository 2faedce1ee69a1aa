"""Configurable procedural scene datasets in the official VQA v2 layout: the *transfer suite*.

vqakit's recipes must train well on data they were not tuned on. ``shapes-rel`` and easy-VQA are ours, so this
module writes other datasets, each a :class:`SceneSpec`: image size (square or not), palette (colour names and RGB
values), shapes, number and size of objects, background, question templates with several paraphrases each, answer
noise and size. They are read back like a user's dataset, through ``--data.dataset vqa-v2 --data.root DIR``.

Question families (the annotation's ``question_type``; the template is ``question_template``):

==============  ==============================================================  ===========
family          example                                                         answer type
==============  ==============================================================  ===========
position        Is the cyan object in the left half of the image?               yes/no
                Which side of the picture is the lime thing on?                 other
attribute       What shape is the cyan object? / What colour is the diamond?    other
counting        How many objects have the same shape as the cyan one?           number
comparison      Are the cyan object and the navy object the same shape?         yes/no
relational      What colour is the object nearest to the cyan one?              other
==============  ==============================================================  ===========

The families follow Sort-of-CLEVR (Santoro et al., 2017, https://arxiv.org/abs/1706.01427: a "relation network"
CNN answers both its non-relational and relational questions at > 94 %), widened with absolute position, size
and paraphrases. Colours are unique within a scene, so "the cyan object" names one object; position and distance
answers must win by a margin (no near-ties). Each question gets 10 human-like answers: surface noise the official
normaliser removes (case, punctuation, articles, number words) and, with probability ``answer_noise`` per answer,
a wrong one, capped so that the majority answer stays right.

Generation is deterministic: image ``i`` of a split draws from ``random.Random`` seeded with the spec's name,
version, seed, split and ``i``.

Example:
    >>> import tempfile
    >>> from vqakit.data.sources import load_vqa_v2
    >>> spec = SUITE["transfer-dots64"].scaled(num_train_images=4, num_val_images=2)
    >>> root = write_scenes(tempfile.mkdtemp(), spec)
    >>> len(load_vqa_v2(root, "val2014").examples)
    10
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw

from vqakit.data.procedural import draw_shape
from vqakit.data.sources import NUM_HUMAN_ANSWERS, vqa_v2_image_path, vqa_v2_paths, vqa_v2_split_name

VERSION = "1"
FAMILIES = ("position", "attribute", "counting", "comparison", "relational")
ALL_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_VAL_ID_OFFSET = 1_000_000


@dataclass(frozen=True)
class SceneSpec:
    """One procedural dataset (saved as ``scenes.json`` next to it).

    Args:
        name: dataset name (part of every image's random seed).
        width: image width in pixels.
        height: image height in pixels.
        palette: colour name -> RGB. At least ``max_objects`` colours (colours are unique within a scene).
        shapes: shapes drawn, a subset of ``ALL_SHAPES``.
        min_objects: fewest objects in a scene (at least 2).
        max_objects: most objects in a scene.
        radius: (smallest, largest) object radius as a fraction of ``min(width, height)``.
        sizes: whether objects come in two sizes (``small`` / ``large``): adds size questions.
        background: ``light``, ``dark`` or ``noise`` (light with per-pixel noise).
        noun: the words the questions use for "object", drawn per question (paraphrase noise).
        paraphrases: how many phrasings of each template are used (1-3).
        families: family -> weight of questions.
        answer_noise: probability that one of the 10 human answers is a wrong one (at most 3 are).
        num_train_images: images in ``train2014``.
        num_val_images: images in ``val2014``.
        questions_per_image: questions per image.
        seed: seed of everything.
    """

    name: str
    width: int
    height: int
    palette: dict
    shapes: tuple = ("circle", "square")
    min_objects: int = 2
    max_objects: int = 4
    radius: tuple = (0.08, 0.11)
    sizes: bool = False
    background: str = "light"
    noun: tuple = ("object",)
    paraphrases: int = 2
    families: dict = field(default_factory=lambda: {f: 1.0 for f in FAMILIES})
    answer_noise: float = 0.1
    num_train_images: int = 1000
    num_val_images: int = 250
    questions_per_image: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.width < 16 or self.height < 16:
            raise ValueError(f"{self.name}: width={self.width}, height={self.height} must be at least 16 pixels")
        unknown = sorted(set(self.shapes) - set(ALL_SHAPES))
        if unknown:
            raise ValueError(f"{self.name}: shapes {unknown} not known; available = {ALL_SHAPES}")
        if not 2 <= self.min_objects <= self.max_objects:
            raise ValueError(f"{self.name}: need 2 <= min_objects={self.min_objects} <= max_objects={self.max_objects}")
        if len(self.palette) < self.max_objects:
            raise ValueError(f"{self.name}: {len(self.palette)} colours cannot colour {self.max_objects} objects "
                             "uniquely")
        if self.background not in ("light", "dark", "noise"):
            raise ValueError(f"{self.name}: background={self.background!r} is not one of ('light', 'dark', 'noise')")
        if not 1 <= self.paraphrases <= 3:
            raise ValueError(f"{self.name}: paraphrases={self.paraphrases} must be in [1, 3]")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise ValueError(f"{self.name}: families {unknown or '{}'} not known; available = {FAMILIES}")
        if not 0 <= self.answer_noise < 0.5:
            raise ValueError(f"{self.name}: answer_noise={self.answer_noise} must be in [0, 0.5)")

    def scaled(self, **changes) -> "SceneSpec":
        """The same dataset with other settings (e.g. fewer images for a test)."""
        return replace(self, **changes)

    @property
    def num_questions(self) -> tuple[int, int]:
        return self.num_train_images * self.questions_per_image, self.num_val_images * self.questions_per_image


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float

    def dist(self, other: "Obj") -> float:
        return math.hypot(self.x - other.x, self.y - other.y)


# ---------------------------------------------------------------------------------------------------
# Scenes


def random_scene(spec: SceneSpec, rng: random.Random) -> list[Obj]:
    """``min_objects``-``max_objects`` non-overlapping objects with distinct colours."""
    side = min(spec.width, spec.height)
    lo, hi = spec.radius[0] * side, spec.radius[1] * side
    while True:
        n = rng.randint(spec.min_objects, spec.max_objects)
        colors = rng.sample(sorted(spec.palette), n)
        objects: list[Obj] = []
        for color in colors:
            if spec.sizes:
                size = rng.choice(("small", "large"))
                r = rng.uniform(lo, lo + 0.25 * (hi - lo)) if size == "small" else rng.uniform(hi - 0.2 * (hi - lo), hi)
            else:
                size, r = "medium", rng.uniform(lo, hi)
            for _ in range(200):
                x, y = rng.uniform(r + 1, spec.width - r - 1), rng.uniform(r + 1, spec.height - r - 1)
                obj = Obj(rng.choice(spec.shapes), color, size, x, y, r)
                if all(obj.dist(o) >= r + o.r + 2 for o in objects):
                    objects.append(obj)
                    break
            else:
                break  # no room: draw the scene again
        if len(objects) == n:
            return objects


def draw_scene(spec: SceneSpec, objects: list[Obj], rng: random.Random) -> Image.Image:
    if spec.background == "dark":
        bg = tuple(rng.randint(10, 40) for _ in range(3))
    else:
        bg = tuple(rng.randint(215, 250) for _ in range(3))
    image = Image.new("RGB", (spec.width, spec.height), bg)
    if spec.background == "noise":
        noise = Image.effect_noise((spec.width, spec.height), 18).convert("RGB")
        image = Image.blend(image, noise, 0.15)
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_shape(draw, o.shape, o.x, o.y, o.r, tuple(spec.palette[o.color]))
    return image


# ---------------------------------------------------------------------------------------------------
# Question templates: (family, template name, answer type, phrasings, builder). A builder returns the phrasing
# arguments and the answer, or None when the scene does not support the question.


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _pick_named(objs, rng):
    return rng.choice(objs)


def _b_side_lr(spec, objs, rng):
    o = _pick_named(objs, rng)
    if abs(o.x - spec.width / 2) < 0.04 * spec.width:
        return None
    left = rng.random() < 0.5
    return {"c": o.color, "side": "left" if left else "right"}, _yn((o.x < spec.width / 2) == left)


def _b_side_tb(spec, objs, rng):
    o = _pick_named(objs, rng)
    if abs(o.y - spec.height / 2) < 0.04 * spec.height:
        return None
    top = rng.random() < 0.5
    return {"c": o.color, "side": "top" if top else "bottom", "side2": "upper" if top else "lower"}, _yn(
        (o.y < spec.height / 2) == top)


def _b_which_side(spec, objs, rng):
    o = _pick_named(objs, rng)
    if abs(o.x - spec.width / 2) < 0.04 * spec.width:
        return None
    return {"c": o.color}, "left" if o.x < spec.width / 2 else "right"


def _b_shape_of(spec, objs, rng):
    o = _pick_named(objs, rng)
    return {"c": o.color}, o.shape


def _b_color_of(spec, objs, rng):
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return {"s": o.shape}, o.color


def _b_size_of(spec, objs, rng):
    if not spec.sizes:
        return None
    o = _pick_named(objs, rng)
    return {"c": o.color}, o.size


def _b_count_same_shape(spec, objs, rng):
    o = _pick_named(objs, rng)
    return {"c": o.color}, str(sum(p.shape == o.shape for p in objs if p is not o))


def _b_count_shape(spec, objs, rng):
    s = rng.choice(spec.shapes)
    return {"s": s, "ss": s + "es" if s.endswith("s") else s + "s"}, str(sum(o.shape == s for o in objs))


def _b_same_shape(spec, objs, rng):
    a, b = rng.sample(objs, 2)
    return {"c": a.color, "c2": b.color}, _yn(a.shape == b.shape)


def _b_bigger(spec, objs, rng):
    if not spec.sizes:
        return None
    a, b = rng.sample(objs, 2)
    if a.size == b.size:
        return None
    return {"c": a.color, "c2": b.color}, _yn(a.r > b.r)


def _nearest(objs, ref, farthest=False):
    others = sorted((o for o in objs if o is not ref), key=ref.dist, reverse=farthest)
    side = max(o.r for o in objs)
    if len(others) > 1 and abs(ref.dist(others[0]) - ref.dist(others[1])) < 0.5 * side:
        return None
    return others[0]


def _b_nearest_color(spec, objs, rng):
    ref = _pick_named(objs, rng)
    o = _nearest(objs, ref)
    return None if o is None else ({"c": ref.color}, o.color)


def _b_nearest_shape(spec, objs, rng):
    ref = _pick_named(objs, rng)
    o = _nearest(objs, ref)
    return None if o is None else ({"c": ref.color}, o.shape)


def _b_farthest_color(spec, objs, rng):
    if len(objs) < 3:
        return None
    ref = _pick_named(objs, rng)
    o = _nearest(objs, ref, farthest=True)
    return None if o is None else ({"c": ref.color}, o.color)


TEMPLATES = [
    ("position", "side_lr", "yes/no", _b_side_lr, [
        "Is the {c} {n} in the {side} half of the image?",
        "Is the {c} {n} on the {side} side of the picture?",
        "Does the {c} {n} sit in the {side} half?"]),
    ("position", "side_tb", "yes/no", _b_side_tb, [
        "Is the {c} {n} in the {side} half of the image?",
        "Is the {c} {n} in the {side2} part of the picture?",
        "Does the {c} {n} sit in the {side} half?"]),
    ("position", "which_side", "other", _b_which_side, [
        "Which side of the image is the {c} {n} on?",
        "Is the {c} {n} on the left or on the right?",
        "On which side is the {c} {n}?"]),
    ("attribute", "shape_of", "other", _b_shape_of, [
        "What shape is the {c} {n}?",
        "What is the shape of the {c} {n}?",
        "Which shape does the {c} {n} have?"]),
    ("attribute", "color_of", "other", _b_color_of, [
        "What color is the {s}?",
        "What is the colour of the {s}?",
        "Which color does the {s} have?"]),
    ("attribute", "size_of", "other", _b_size_of, [
        "What size is the {c} {n}?",
        "Is the {c} {n} small or large?",
        "How big is the {c} {n}?"]),
    ("counting", "count_same_shape", "number", _b_count_same_shape, [
        "How many other objects have the same shape as the {c} {n}?",
        "How many other things share the shape of the {c} {n}?",
        "Count the other objects shaped like the {c} {n}."]),
    ("counting", "count_shape", "number", _b_count_shape, [
        "How many {ss} are there?",
        "How many {ss} are in the image?",
        "What is the number of {ss}?"]),
    ("comparison", "same_shape", "yes/no", _b_same_shape, [
        "Are the {c} {n} and the {c2} {n} the same shape?",
        "Do the {c} {n} and the {c2} {n} have the same shape?",
        "Is the {c} {n} shaped like the {c2} {n}?"]),
    ("comparison", "bigger", "yes/no", _b_bigger, [
        "Is the {c} {n} bigger than the {c2} {n}?",
        "Is the {c} {n} larger than the {c2} {n}?",
        "Is the {c} {n} the bigger one, compared with the {c2} {n}?"]),
    ("relational", "nearest_color", "other", _b_nearest_color, [
        "What color is the {n} closest to the {c} {n}?",
        "What is the colour of the {n} nearest to the {c} one?",
        "Which color has the {n} next to the {c} {n}?"]),
    ("relational", "nearest_shape", "other", _b_nearest_shape, [
        "What shape is the {n} closest to the {c} {n}?",
        "What is the shape of the {n} nearest to the {c} one?",
        "Which shape has the {n} next to the {c} {n}?"]),
    ("relational", "farthest_color", "other", _b_farthest_color, [
        "What color is the {n} farthest from the {c} {n}?",
        "What is the colour of the {n} furthest from the {c} one?",
        "Which color has the {n} most distant from the {c} {n}?"]),
]


def ask(spec: SceneSpec, objs: list[Obj], family: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(question, answer, answer type, template) of ``family`` for the scene."""
    templates = [t for t in TEMPLATES if t[0] == family]
    for _ in range(60):
        fam, name, answer_type, build, phrasings = rng.choice(templates)
        built = build(spec, objs, rng)
        if built is None:
            continue
        args, answer = built
        text = rng.choice(phrasings[: spec.paraphrases]).format(n=rng.choice(spec.noun), **args)
        return text, answer, answer_type, name
    return None


def human_answers(spec: SceneSpec, answer: str, answer_type: str, rng: random.Random) -> list[str]:
    """10 raw answers: the true one with surface noise, and up to 3 wrong ones (each with ``answer_noise``)."""
    if answer_type == "number":
        surface = [answer, _NUMBER_WORDS.get(int(answer), answer), answer + " "]
        wrong_pool = [str(int(answer) + d) for d in (-1, 1) if int(answer) + d >= 0]
    else:
        surface = [answer, answer.capitalize(), answer.upper(), answer + ".", "the " + answer]
        if answer_type == "yes/no":
            wrong_pool = ["no" if answer == "yes" else "yes"]
        else:
            pools = [list(spec.palette), list(spec.shapes), ["small", "large"], ["left", "right"]]
            pool = next((p for p in pools if answer in p), [answer])
            wrong_pool = [v for v in pool if v != answer] or [answer]
    raw = [rng.choice(surface) if rng.random() < 0.4 else answer for _ in range(NUM_HUMAN_ANSWERS)]
    wrong = 0
    for i in rng.sample(range(NUM_HUMAN_ANSWERS), NUM_HUMAN_ANSWERS):
        if wrong < 3 and rng.random() < spec.answer_noise:
            raw[i] = rng.choice(wrong_pool)
            wrong += 1
    return raw


# ---------------------------------------------------------------------------------------------------
# Writing a dataset


def _families(spec: SceneSpec, n: int, rng: random.Random) -> list[str]:
    names = sorted(spec.families)
    return rng.choices(names, weights=[spec.families[f] for f in names], k=n)


def generate_split(root: str | Path, spec: SceneSpec, split: str) -> int:
    """Write ``train`` (train2014) or ``val`` (val2014) of ``spec`` under ``root``; returns the question count."""
    from vqakit.data.formats import write_vqa_v2_json

    if split not in ("train", "val"):
        raise ValueError(f"scene split {split!r} not found; available splits = ['train', 'val']")
    name = vqa_v2_split_name("train2014" if split == "train" else "val2014")
    n_images = spec.num_train_images if split == "train" else spec.num_val_images
    offset = 0 if split == "train" else _VAL_ID_OFFSET
    questions_path, annotations_path, image_dir = vqa_v2_paths(root, name)
    image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, scenes = [], [], []
    for i in range(n_images):
        rng = random.Random(f"scenes-v{VERSION}-{spec.name}-{spec.seed}-{split}-{i}")
        image_id = offset + i + 1
        objects = random_scene(spec, rng)
        draw_scene(spec, objects, rng).save(vqa_v2_image_path(image_dir, name, image_id), "JPEG", quality=95)
        scenes.append({"image_id": image_id, "objects": [asdict(o) for o in objects]})
        asked = set()
        for k, family in enumerate(_families(spec, spec.questions_per_image, rng)):
            for _ in range(10):  # the same question twice about one image is asked again
                q = ask(spec, objects, family, rng)
                if q is not None and q[0] not in asked:
                    break
            if q is None:
                continue
            text, answer, answer_type, template = q
            asked.add(text)
            qid = image_id * 100 + k
            questions.append({"image_id": image_id, "question": text, "question_id": qid})
            annotations.append({
                "question_type": family,
                "question_template": template,
                "multiple_choice_answer": answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(human_answers(spec, answer, answer_type, rng))],
                "image_id": image_id,
                "answer_type": answer_type,
                "question_id": qid,
            })  # fmt: skip
    write_vqa_v2_json(questions_path, annotations_path, name, questions, annotations,
                      description=f"vqakit procedural scenes v{VERSION}: {spec.name}")
    (Path(root) / f"scenes_{name}.json").write_text(json.dumps(scenes))
    return len(questions)


def write_scenes(root: str | Path, spec: SceneSpec) -> Path:
    """Write both splits of ``spec`` under ``root`` in the official VQA v2 layout, and ``scenes.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {split: generate_split(root, spec, split) for split in ("train", "val")}
    meta = {"version": VERSION, "questions": counts, **asdict(spec)}
    (root / "scenes.json").write_text(json.dumps(meta, indent=1) + "\n")
    return root


def _colors(*names_rgb) -> dict:
    return dict(names_rgb)


# The transfer suite: four datasets that share nothing with shapes-rel or easy-VQA but the idea. They differ in
# image size (64, 75, 128, 320x240), palette, shapes, object count and size, background, phrasing, noise and size
# (5k to 200k training questions).
SUITE: dict[str, SceneSpec] = {
    spec.name: spec
    for spec in (
        SceneSpec(
            name="transfer-dots64", width=64, height=64,
            palette=_colors(("cyan", (0, 190, 210)), ("magenta", (205, 0, 160)), ("lime", (120, 220, 0)),
                            ("navy", (20, 30, 120))),
            shapes=("circle", "square"), min_objects=2, max_objects=3, radius=(0.09, 0.12),
            noun=("object", "thing"), paraphrases=2, answer_noise=0.05,
            num_train_images=1000, num_val_images=400, questions_per_image=5),
        SceneSpec(
            name="transfer-sort75", width=75, height=75,
            palette=_colors(("red", (230, 30, 30)), ("green", (30, 170, 50)), ("blue", (30, 60, 230)),
                            ("orange", (250, 140, 20)), ("gray", (128, 128, 128)), ("yellow", (240, 220, 20))),
            shapes=("circle", "square"), min_objects=6, max_objects=6, radius=(0.065, 0.075),
            noun=("object", "shape", "item"), paraphrases=3, answer_noise=0.15,
            num_train_images=4000, num_val_images=1000, questions_per_image=10),
        SceneSpec(
            name="transfer-clutter128", width=128, height=128,
            palette=_colors(("teal", (0, 128, 128)), ("pink", (255, 120, 180)), ("brown", (130, 80, 30)),
                            ("olive", (128, 128, 0)), ("navy", (10, 20, 110)), ("maroon", (120, 0, 20)),
                            ("lime", (110, 230, 30)), ("violet", (150, 80, 230))),
            shapes=("circle", "square", "triangle", "diamond"), min_objects=3, max_objects=8,
            radius=(0.045, 0.09), sizes=True, background="noise", noun=("object", "thing", "shape"),
            paraphrases=3, answer_noise=0.1, num_train_images=20000, num_val_images=1000, questions_per_image=10),
        SceneSpec(
            name="transfer-wide320", width=320, height=240,
            palette=_colors(("crimson", (220, 20, 60)), ("gold", (255, 200, 0)), ("azure", (40, 140, 255)),
                            ("emerald", (20, 200, 110)), ("white", (240, 240, 240)), ("coral", (255, 120, 80))),
            shapes=("circle", "triangle", "cross"), min_objects=2, max_objects=6, radius=(0.05, 0.09),
            background="dark", noun=("object", "item"), paraphrases=3, answer_noise=0.1,
            num_train_images=2000, num_val_images=500, questions_per_image=10),
    )
}


def suite_root(name: str, base: str | Path | None = None) -> Path:
    from vqakit.data.cache import default_cache_dir

    return Path(base or default_cache_dir() / "datasets") / f"{name}-v{VERSION}"


def ensure_suite_dataset(name: str, base: str | Path | None = None) -> Path:
    """The folder of transfer-suite dataset ``name``, written once (idempotent) under ``base``."""
    if name not in SUITE:
        raise ValueError(f"transfer dataset {name!r} not found; available = {sorted(SUITE)}")
    root = suite_root(name, base)
    if not (root / "scenes.json").is_file():
        tmp = root.with_name(root.name + ".partial")
        write_scenes(tmp, SUITE[name])
        if root.exists():
            import shutil

            shutil.rmtree(root)
        tmp.rename(root)
    return root


def family_counts(root: str | Path) -> Counter:
    """Questions per family in ``root``'s train split (a check of a written dataset)."""
    _, path, _ = vqa_v2_paths(root, "train2014")
    ann = json.loads(path.read_text())
    return Counter(a["question_type"] for a in ann["annotations"])
