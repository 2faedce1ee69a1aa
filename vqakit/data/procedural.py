"""``shapes-rel``: a procedural VQA benchmark, harder than easy-VQA, with relational questions.

Every image is a scene of 2-5 objects (shape, colour, size, position; sometimes one object partly
hides another). Every question belongs to one of five *families*:

=============  =======================================================  ===========================
family         example                                                  answer type
=============  =======================================================  ===========================
attribute      What shape is the red object? / What size is the ...?     other
existence      Is there a green circle?                                  yes/no
counting       How many triangles are there?                             number
comparison     Is the red object bigger than the blue object?            yes/no
relational     What shape is the object closest to the red one?          other, yes/no
=============  =======================================================  ===========================

Colours are unique within a scene, so "the red object" always names one object; relational
questions are only asked when the answer is unambiguous by a clear margin (no near-ties).

Each question gets 10 human-like answers: mostly the true answer with surface noise the official
normaliser removes (``"Red"``, ``"red."``, ``"a circle"``, ``"two"``), a few synonyms (``"big"``,
``"round"``, ``"violet"``) and sometimes one wrong answer, so the majority answer is always right
and the official accuracy of the true answer is 1.

Splits are written in the official VQA v2 layout (``train2014`` and ``val2014``) and read back by
``vqakit.data.sources.load_vqa_v2``. The family is the annotation's ``question_type`` (so every
per-question-type metric is a per-family metric); the template is kept as ``question_template``.
``shapes_rel_{split}_scenes.json`` holds the scene graphs.

Generation is deterministic: image ``i`` of a split is drawn from ``random.Random`` seeded with
``(seed, split, i)``, so any size is a prefix-stable sample and two runs write identical files.

Example:
    >>> import tempfile
    >>> root = write_shapes_rel(tempfile.mkdtemp(), num_train_images=4, num_val_images=2, questions_per_image=5)
    >>> from vqakit.data.sources import load_vqa_v2
    >>> len(load_vqa_v2(root, "val").examples)
    10
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vqakit.data.sources import NUM_HUMAN_ANSWERS, vqa_v2_image_path, vqa_v2_paths, vqa_v2_split_name

VERSION = "1"
CANVAS = 128  # pixels, square
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 70, 215),
    "yellow": (235, 210, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (8, 10), "large": (15, 18)}  # radius range in pixels
FAMILIES = ("attribute", "existence", "counting", "comparison", "relational")
SPLITS = {"train": "train2014", "val": "val2014"}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
MARGIN = 6.0  # pixels: a relational answer must win by at least this much (no near-ties)

_SYNONYMS = {
    "circle": ["round", "circle shape"],
    "square": ["box", "rectangle"],
    "triangle": ["triangular"],
    "purple": ["violet"],
    "large": ["big"],
    "small": ["little", "tiny"],
    "yes": ["yep"],
    "no": ["nope"],
}
_NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    r: float  # radius, pixels

    def dist(self, other: "SceneObject") -> float:
        return math.hypot(self.x - other.x, self.y - other.y)


@dataclass
class Question:
    question: str
    answer: str
    answer_type: str
    family: str
    template: str


# ---------------------------------------------------------------------------------------------------
# Scenes


def random_scene(rng: random.Random, occlusion: float = 0.15) -> list[SceneObject]:
    """2-5 objects with distinct colours; with probability ``occlusion`` one overlaps an earlier one."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    colors = rng.sample(sorted(COLORS), n)
    occlude = rng.random() < occlusion
    while True:  # rejection sampling of positions; a few tries suffice at this density
        objects: list[SceneObject] = []
        for i, color in enumerate(colors):
            size = rng.choice(sorted(SIZES))
            r = rng.uniform(*SIZES[size])
            for _ in range(100):
                if occlude and i == n - 1:  # the last object, drawn on top, partly hides an earlier one
                    other = rng.choice(objects)
                    angle, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.75, 0.95) * (r + other.r)
                    x, y = other.x + d * math.cos(angle), other.y + d * math.sin(angle)
                    if not (r + 2 <= x <= CANVAS - r - 2 and r + 2 <= y <= CANVAS - r - 2):
                        continue
                    obj = SceneObject(rng.choice(SHAPES), color, size, x, y, r)
                    if all(obj.dist(o) >= r + o.r + 3 for o in objects if o is not other):
                        break
                else:
                    x, y = rng.uniform(r + 2, CANVAS - r - 2), rng.uniform(r + 2, CANVAS - r - 2)
                    obj = SceneObject(rng.choice(SHAPES), color, size, x, y, r)
                    if all(obj.dist(o) >= r + o.r + 3 for o in objects):
                        break
            else:
                break  # no room: start the scene over
            objects.append(obj)
        if len(objects) == n:
            return objects


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    """Draw one ``shape`` (``circle``, ``square``, ``triangle``, ``diamond`` or ``cross``) of radius ``r``
    centred on ``(x, y)``, filled with the RGB ``fill``."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same visual weight as the circle
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    else:
        raise ValueError(f"shape {shape!r} not known; available = circle, square, triangle, diamond, cross")


def draw_scene(objects: list[SceneObject], rng: random.Random) -> Image.Image:
    """Objects in list order (later ones on top) on a light, slightly varying background."""
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (CANVAS, CANVAS), bg)
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_shape(draw, o.shape, o.x, o.y, o.r, COLORS[o.color])
    return image


# ---------------------------------------------------------------------------------------------------
# Question families. Each template returns a Question, or None when the scene does not support it.


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + "s"


def _q_shape_of_color(objs, rng):
    o = rng.choice(objs)
    return Question(f"What shape is the {o.color} object?", o.shape, "other", "attribute", "shape_of_color")


def _q_color_of_shape(objs, rng):
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return Question(f"What color is the {o.shape}?", o.color, "other", "attribute", "color_of_shape")


def _q_size_of_color(objs, rng):
    o = rng.choice(objs)
    return Question(f"What size is the {o.color} {o.shape}?", o.size, "other", "attribute", "size_of_color")


def _q_exists_color_shape(objs, rng):
    if rng.random() < 0.5:
        o = rng.choice(objs)
        color, shape = o.color, o.shape
    else:
        present = {(o.color, o.shape) for o in objs}
        absent = [(c, s) for c in sorted(COLORS) for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
    answer = _yes_no(any(o.color == color and o.shape == shape for o in objs))
    return Question(f"Is there {_a(color)} {shape}?", answer, "yes/no", "existence", "exists_color_shape")


def _q_exists_size_shape(objs, rng):
    size, shape = rng.choice(sorted(SIZES)), rng.choice(SHAPES)
    answer = _yes_no(any(o.size == size and o.shape == shape for o in objs))
    return Question(f"Is there {_a(size)} {shape}?", answer, "yes/no", "existence", "exists_size_shape")


def _q_count_shape(objs, rng):
    shape = rng.choice(SHAPES)
    n = sum(o.shape == shape for o in objs)
    return Question(f"How many {_plural(shape)} are there?", str(n), "number", "counting", "count_shape")


def _q_count_all(objs, rng):
    return Question("How many objects are there?", str(len(objs)), "number", "counting", "count_all")


def _q_count_size(objs, rng):
    size = rng.choice(sorted(SIZES))
    n = sum(o.size == size for o in objs)
    return Question(f"How many {size} objects are there?", str(n), "number", "counting", "count_size")


def _q_bigger(objs, rng):
    a, b = rng.sample(objs, 2)
    answer = _yes_no(a.size == "large" and b.size == "small")
    return Question(f"Is the {a.color} object bigger than the {b.color} object?", answer, "yes/no", "comparison",
                    "bigger")


def _q_same_shape(objs, rng):
    a, b = rng.sample(objs, 2)
    return Question(f"Are the {a.color} object and the {b.color} object the same shape?", _yes_no(a.shape == b.shape),
                    "yes/no", "comparison", "same_shape")


def _q_more_shapes(objs, rng):
    s1, s2 = rng.sample(SHAPES, 2)
    counts = Counter(o.shape for o in objs)
    return Question(f"Are there more {_plural(s1)} than {_plural(s2)}?", _yes_no(counts[s1] > counts[s2]), "yes/no",
                    "comparison", "more_shapes")


def _nearest(objs, ref, farthest: bool = False):
    others = sorted((o for o in objs if o is not ref), key=lambda o: ref.dist(o), reverse=farthest)
    if len(others) > 1 and abs(ref.dist(others[0]) - ref.dist(others[1])) < MARGIN:
        return None  # a near-tie: the question would be ambiguous
    return others[0]


def _q_closest(objs, rng):
    ref = rng.choice(objs)
    o = _nearest(objs, ref)
    if o is None:
        return None
    if rng.random() < 0.5:
        return Question(f"What shape is the object closest to the {ref.color} one?", o.shape, "other", "relational",
                        "closest_shape")
    return Question(f"What color is the object closest to the {ref.color} object?", o.color, "other", "relational",
                    "closest_color")


def _q_farthest(objs, rng):
    if len(objs) < 3:
        return None
    ref = rng.choice(objs)
    o = _nearest(objs, ref, farthest=True)
    if o is None:
        return None
    return Question(f"What color is the object farthest from the {ref.color} object?", o.color, "other", "relational",
                    "farthest_color")


def _q_left_of(objs, rng):
    a, b = rng.sample(objs, 2)
    if abs(a.x - b.x) < MARGIN:
        return None
    return Question(f"Is the {a.color} object to the left of the {b.color} object?", _yes_no(a.x < b.x), "yes/no",
                    "relational", "left_of")


def _q_above(objs, rng):
    a, b = rng.sample(objs, 2)
    if abs(a.y - b.y) < MARGIN:
        return None
    return Question(f"Is the {a.color} object above the {b.color} object?", _yes_no(a.y < b.y), "yes/no",
                    "relational", "above")


def _q_leftmost(objs, rng):
    by_x = sorted(objs, key=lambda o: o.x)
    if by_x[1].x - by_x[0].x < MARGIN:
        return None
    return Question("What shape is the leftmost object?", by_x[0].shape, "other", "relational", "leftmost_shape")


TEMPLATES: dict[str, list[Callable]] = {
    "attribute": [_q_shape_of_color, _q_color_of_shape, _q_size_of_color],
    "existence": [_q_exists_color_shape, _q_exists_size_shape],
    "counting": [_q_count_shape, _q_count_all, _q_count_size],
    "comparison": [_q_bigger, _q_same_shape, _q_more_shapes],
    "relational": [_q_closest, _q_farthest, _q_left_of, _q_above, _q_leftmost],
}


def ask(objs: list[SceneObject], family: str, rng: random.Random) -> Question:
    """A question of ``family`` about the scene (templates the scene does not support are re-drawn)."""
    for _ in range(50):
        q = rng.choice(TEMPLATES[family])(objs, rng)
        if q is not None:
            return q
    return _q_shape_of_color(objs, rng) if family == "attribute" else ask(objs, "attribute", rng)


# ---------------------------------------------------------------------------------------------------
# Human answers


def human_answers(answer: str, answer_type: str, rng: random.Random) -> list[str]:
    """10 raw answers: the true one with case/punctuation/article/number-word noise, up to 2 synonyms,
    and with probability 0.3 one dissenter. At least 7 normalise to ``answer``, so it is the majority."""
    if answer_type == "number":
        surface = [answer, _NUMBER_WORDS.get(int(answer), answer), answer + " "]
        dissent = str(int(answer) + rng.choice([-1, 1]) if answer != "0" else 1)
    else:
        surface = [answer, answer.capitalize(), answer.upper(), answer + ".", answer + " "]
        if answer_type == "other" and answer in SHAPES:
            surface.append("a " + answer)
        if answer_type == "yes/no":
            dissent = "no" if answer == "yes" else "yes"
        else:
            pool = SHAPES if answer in SHAPES else sorted(SIZES) if answer in SIZES else sorted(COLORS)
            dissent = rng.choice([v for v in pool if v != answer])
    raw = [answer] * NUM_HUMAN_ANSWERS
    slots = list(range(NUM_HUMAN_ANSWERS))
    rng.shuffle(slots)
    for i in slots[: rng.randint(2, 5)]:
        raw[i] = rng.choice(surface)
    synonyms = _SYNONYMS.get(answer, [])
    n_syn = rng.choice([0, 0, 1, 2]) if synonyms else 0
    for i in slots[5 : 5 + n_syn]:
        raw[i] = rng.choice(synonyms)
    if rng.random() < 0.3:
        raw[slots[-1]] = dissent
    return raw


# ---------------------------------------------------------------------------------------------------
# Writing a split in the official VQA v2 layout


@dataclass
class ShapesRelConfig:
    """Settings of a generated ``shapes-rel`` dataset (saved as ``shapes_rel.json`` next to it).

    Args:
        num_train_images: images in ``train2014``.
        num_val_images: images in ``val2014``.
        questions_per_image: questions per image, families balanced (at most 10). The default, 10 questions
            on 2,000 / 500 images (20k / 5k questions), keeps the frozen-feature cost of the benchmark low.
        occlusion: probability that a scene has one object partly hiding another.
        seed: seed of everything.
    """

    num_train_images: int = 2000
    num_val_images: int = 500
    questions_per_image: int = 10
    occlusion: float = 0.15
    seed: int = 0

    def __post_init__(self):
        if self.num_train_images < 1 or self.num_val_images < 1:
            raise ValueError(f"num_train_images={self.num_train_images} and num_val_images={self.num_val_images} "
                             "must be at least 1")
        if not 1 <= self.questions_per_image <= 10:
            raise ValueError(f"questions_per_image={self.questions_per_image} must be in [1, 10]")
        if not 0.0 <= self.occlusion <= 1.0:
            raise ValueError(f"occlusion={self.occlusion} must be in [0, 1]")


# image ids of val start here, so the ids of the two splits never collide (as in COCO)
_VAL_ID_OFFSET = 1_000_000


def generate_split(root: str | Path, split: str, cfg: ShapesRelConfig) -> int:
    """Write one split (``train`` or ``val``) under ``root``; returns the number of questions."""
    if split not in SPLITS:
        raise ValueError(f"shapes-rel split {split!r} not found; available splits = {list(SPLITS)}")
    name = vqa_v2_split_name(SPLITS[split])
    n_images = cfg.num_train_images if split == "train" else cfg.num_val_images
    offset = 0 if split == "train" else _VAL_ID_OFFSET
    questions_path, annotations_path, image_dir = vqa_v2_paths(root, name)
    image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, scenes = [], [], []
    for i in range(n_images):
        rng = random.Random(f"shapes-rel-v{VERSION}-{cfg.seed}-{split}-{i}")  # str seeds: stable across runs
        image_id = offset + i + 1
        objects = random_scene(rng, cfg.occlusion)
        draw_scene(objects, rng).save(vqa_v2_image_path(image_dir, name, image_id), "JPEG", quality=92)
        scenes.append({"image_id": image_id, "objects": [asdict(o) for o in objects]})
        families = [FAMILIES[k % len(FAMILIES)] for k in range(cfg.questions_per_image)]
        rng.shuffle(families)
        asked = set()
        for k, family in enumerate(families):
            q = ask(objects, family, rng)
            for _ in range(10):  # avoid asking the same question twice about one image
                if q.question not in asked:
                    break
                q = ask(objects, family, rng)
            asked.add(q.question)
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": q.question, "question_id": qid})
            annotations.append({
                "question_type": q.family,
                "question_template": q.template,
                "multiple_choice_answer": q.answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(human_answers(q.answer, q.answer_type, rng))],
                "image_id": image_id,
                "answer_type": q.answer_type,
                "question_id": qid,
            })  # fmt: skip
    from vqakit.data.formats import write_vqa_v2_json

    write_vqa_v2_json(questions_path, annotations_path, name, questions, annotations,
                      description=f"shapes-rel v{VERSION}: vqakit procedural relational benchmark")
    (Path(root) / f"shapes_rel_{name}_scenes.json").write_text(json.dumps(scenes))
    return len(questions)


def write_shapes_rel(root: str | Path, **settings) -> Path:
    """Generate both splits under ``root`` (keyword arguments: the fields of ``ShapesRelConfig``)."""
    cfg = ShapesRelConfig(**settings)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        generate_split(root, split, cfg)
    (root / "shapes_rel.json").write_text(json.dumps({"version": VERSION, **asdict(cfg)}, indent=1) + "\n")
    return root


def default_root(cfg: ShapesRelConfig | None = None) -> Path:
    from vqakit.data.cache import default_cache_dir

    cfg = cfg or ShapesRelConfig()
    return default_cache_dir() / "datasets" / (
        f"shapes-rel-v{VERSION}-{cfg.num_train_images}-{cfg.num_val_images}-q{cfg.questions_per_image}-"
        f"o{cfg.occlusion}-s{cfg.seed}"
    )


def load_shapes_rel(split: str, root: str | Path | None = None, **settings):
    """Examples of a ``shapes-rel`` split (``train`` or ``val``). With no ``root``, the dataset is generated
    once (settings: the fields of ``ShapesRelConfig``) under the cache directory and reused."""
    from vqakit.data.sources import load_vqa_v2

    if split not in SPLITS:
        raise ValueError(f"shapes-rel split {split!r} not found; available splits = {list(SPLITS)}")
    if root is None:
        cfg = ShapesRelConfig(**settings)
        root = default_root(cfg)
        if not (root / "shapes_rel.json").is_file():
            write_shapes_rel(root, **asdict(cfg))
    elif settings:
        raise ValueError(f"shapes-rel settings {sorted(settings)} only apply when the dataset is generated (no root); "
                         f"{root} was generated with the settings in its shapes_rel.json")
    elif not (Path(root) / "shapes_rel.json").is_file():
        raise FileNotFoundError(f"{Path(root) / 'shapes_rel.json'} not found: {root} is not a generated shapes-rel "
                                "dataset; write one with `vqakit generate --out_dir DIR`")
    return load_vqa_v2(root, SPLITS[split]).examples
