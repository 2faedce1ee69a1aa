"""``--recipe auto``: a training recipe derived from the data, not from the datasets vqakit was tuned on.

It reads the training split once (questions, answers, a sample of image headers) and decides:

- **image size and grid**: the images' native resolution (no blurry upsampling of small images; large ones only
  as far down as the CPU budget needs), and the EfficientNet stage whose grid gives 8-16 cells a side
  (stride 8 for images up to 96 px, else 16), cut after that stage, with per-cell colour statistics;
- **fusion**: the relational find / relate / read steps (``RelationalFusion``), which answer attribute, position,
  counting, comparison and relation questions alike; more steps for longer questions, the last of them free to
  read any word of the question; from 10,000 training questions up no self-attention over the image cells before
  the steps, which read each cell's own features;
- **width and regularisation**: for small data (under 10,000 training questions, each seen up to 40 times) half
  the width, dropout and more weight decay, so that the fusion learns the rule instead of memorising the questions,
  and a first step that finds what the whole question names, whatever its wording;
- **answer head and loss**: the vocabulary covering the answers; soft-score BCE where humans disagree (real
  photos), cross-entropy on the majority answer where they mostly agree;
- **schedule**: a number of optimizer steps from the dataset size (passes enough for small data, fewer for large
  data), capped so that training fits ``budget_minutes`` on this machine, warm-up and cosine decay over exactly
  those steps.

Every choice comes with its reason; the recipe is printed, written to the run directory as ``recipe.yaml`` (a
preset: ``vqakit train --config runs/x/recipe.yaml`` repeats it) and the reasons to ``recipe_reasons.json``.
Options given on the command line override the recipe's.

Data the recipe cannot train on is refused before anything is built, naming what and where: an empty split, no
answers, a single answer class, images that fail to decode, image sizes that vary wildly (reported, the median is
used).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqakit.data.answers import AnswerVocab, majority_answer, normalize_answer
from vqakit.data.config import DataConfig, load_split

# Seconds per optimizer step of the relational recipe on 2 idle CPU cores (batch 160, frozen towers, 5 steps), by
# grid cells, without self-attention over the cells (the recipe from _SMALL_DATA questions up): measured alone, 2
# threads, 300 steps each, time to train / steps (2026-12-06; transfer-clutter128 at 64 cells, transfer-wide320 at
# 160, 192, 224 and 256 px; 196 cells: the plan's timer, that run's second half shared the cores).
_SECONDS_PER_STEP = {64: 0.14, 100: 0.21, 144: 0.25, 196: 0.30, 256: 0.44}
# The same with one self-attention layer over the cells (the recipe under _SMALL_DATA questions). 64 and 100:
# measured by the training plan's timer (transfer-clutter128 0.211 s, transfer-sort75 0.243-0.260 s, alone,
# 2026-12-06); 144 and 256: the fusion's forward+backward cost relative to 64 cells, before the image-side gather
# became an index_select (~20% faster), so on the slow side. Only the budget cap uses these tables; every run
# measures its own s/step and prints the estimate (training plan).
_SECONDS_PER_STEP_IMAGE_LAYER = {64: 0.22, 100: 0.26, 144: 0.48, 256: 0.85}
# The question's find step adds ~20% to the fusion's forward+backward (0.193 -> 0.234 s at 64 cells, 0.302 -> 0.361 s
# at 100; one thread, side by side), applied to the whole step.
_QUESTION_FIND_COST = 1.2
# Below this many training questions the fusion is narrowed and regularised. transfer-dots64 (4,487 questions,
# 40 passes) reached a training loss of 0.001 at width 128 without dropout, and its position questions fell to
# chance on two seeds of five; at width 64, dropout 0.1, weight decay 0.05 five seeds averaged 97.57 against
# 95.72, worst family 85.7 against 72.2, in half the time (docs/LOG.md, 2026-12-06); vqakit tune had picked the
# same direction. With the question's find step as well, all five seeds met the per-family target (mean 98.55).
_SMALL_DATA = 10_000
_MAX_ANSWERS = 3000  # majority answers kept as classes at most (the most frequent)


@dataclass
class DataProfile:
    """What the recipe looks at."""

    num_questions: int
    num_images: int
    image_width: int  # medians over a sample
    image_height: int
    size_spread: float  # largest / smallest long side in the sample
    num_answers: int
    answer_types: dict
    agreement: float  # mean fraction of the 10 human answers equal to the majority (normalised)
    question_words: float  # mean
    question_words_max: int
    top_answer_share: float
    bad_images: list = field(default_factory=list)
    # answer classes the vocabulary needs so that it holds every majority answer (up to the 3,000 most frequent):
    # the vocabulary ranks answers by how often humans gave them, so a frequent synonym ("yep", "violet") can
    # outrank a real majority answer; 0: not measured (a profile made by hand), use num_answers
    vocab_classes: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AutoRecipe:
    config: dict  # {"model": {...}, "data": {...}, "train": {...}}, the keys of a preset
    reasons: list  # [(key, value, why)]
    profile: DataProfile

    def describe(self) -> str:
        lines = [f"auto recipe for {self.profile.num_questions:,} questions on {self.profile.num_images:,} images "
                 f"({self.profile.image_width}x{self.profile.image_height} px, {self.profile.num_answers} answers):"]
        width = max(len(k) for k, _, _ in self.reasons)
        lines += [f"  {k:<{width}}  {v!s:<14} {why}" for k, v, why in self.reasons]
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> Path:
        import yaml

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        header = "# written by --recipe auto; repeat the run with: vqakit train --config THIS_FILE\n"
        (out / "recipe.yaml").write_text(header + yaml.safe_dump(self.config, sort_keys=False))
        (out / "recipe_reasons.json").write_text(json.dumps(
            {"reasons": [{"key": k, "value": v, "why": w} for k, v, w in self.reasons],
             "profile": self.profile.to_dict()}, indent=1) + "\n")
        return out / "recipe.yaml"


def profile_data(data: DataConfig, sample_images: int = 256) -> DataProfile:
    """Read the training split: counts, answer statistics, question lengths, image sizes of a seeded sample."""
    from PIL import Image

    examples = load_split(data, data.train_split)
    where = f"{data.dataset} split {data.train_split!r}" + (f" under {data.root}" if data.root else "")
    if not examples:
        raise ValueError(f"{where} has no questions: nothing to train on")
    no_answers = [e.question_id for e in examples if not any(a.strip() for a in e.answers)]
    if len(no_answers) == len(examples):
        raise ValueError(f"{where}: no question has an answer (first ids {no_answers[:5]}); a training split needs "
                         "answers")
    majorities = [majority_answer(e.answers) for e in examples if e.answers]
    counts = Counter(majorities)
    if len(counts) < 2:
        raise ValueError(f"{where}: every question has the same answer {next(iter(counts))!r}: a classifier has "
                         "nothing to learn (is the answers field mapped right?)")
    agreement = statistics.fmean(
        sum(normalize_answer(a) == m for a in e.answers) / len(e.answers)
        for e, m in zip((e for e in examples if e.answers), majorities))
    vocab_classes = _vocab_classes([e.answers for e in examples if e.answers], counts)
    words = [len(e.question.split()) for e in examples]
    images = sorted({e.image for e in examples})
    rng = random.Random(0)
    sample = rng.sample(images, min(sample_images, len(images)))
    sizes, bad = [], []
    for path in sample:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except Exception as err:  # noqa: BLE001 - any decode failure is reported with its path
            bad.append(f"{path}: {err}")
    if not sizes:
        raise ValueError(f"{where}: none of {len(sample)} sampled images could be opened, e.g. {bad[:3]}")
    if len(bad) > 0.5 * len(sample):
        raise ValueError(f"{where}: {len(bad)} of {len(sample)} sampled images fail to decode, e.g. {bad[:3]}")
    longs = [max(s) for s in sizes]
    return DataProfile(
        num_questions=len(examples), num_images=len(images),
        image_width=int(statistics.median(w for w, _ in sizes)), image_height=int(statistics.median(h for _, h in sizes)),
        size_spread=round(max(longs) / min(longs), 2), num_answers=len(counts),
        answer_types=dict(Counter(e.answer_type for e in examples)), agreement=round(agreement, 3),
        question_words=round(statistics.fmean(words), 1), question_words_max=max(words),
        top_answer_share=round(counts.most_common(1)[0][1] / len(majorities), 3), bad_images=bad,
        vocab_classes=vocab_classes,
    )  # fmt: skip


def _vocab_classes(answer_lists: list, majorities: Counter, keep: int = _MAX_ANSWERS) -> int:
    """The ``top_k`` for :meth:`AnswerVocab.build` that keeps the ``keep`` most frequent majority answers.

    The vocabulary counts every human answer, so with noisy answers a synonym given often (``"yep"`` next to
    ``"yes"``) can rank above a majority answer that fewer questions have (``"purple"``): a ``top_k`` equal to
    the number of majority answers would then leave that answer out, and its questions could never be answered.
    The cut is moved past answers given nearly as often (within 10%) as the last one kept, so that the
    training split (the data less the carved validation images) ranks the same answers above it.
    """
    vocab = AnswerVocab.build(answer_lists, top_k=10**9)
    rank = {a: i for i, a in enumerate(vocab.answers)}
    k = max(rank[a] for a, _ in majorities.most_common(keep) if a in rank) + 1
    while k < len(vocab) and vocab.counts[k] >= 0.9 * vocab.counts[k - 1]:
        k += 1
    return k


def _round_up(x: float, m: int) -> int:
    return int(math.ceil(x / m) * m)


def auto_recipe(data: DataConfig, budget_minutes: float = 18.0, batch_size: int = 160,
                profile: DataProfile | None = None) -> AutoRecipe:
    """The recipe for ``data`` (see the module docstring).

    Args:
        data: the data of the run (its train split is read).
        budget_minutes: the schedule is capped to train in about this long on a 2-core CPU.
        batch_size: questions per step.
        profile: a profile already computed (tests).
    """
    p = profile or profile_data(data)
    reasons: list = []

    def choose(key, value, why):
        reasons.append((key, value, why))
        return value

    val_fraction = 0.05 if p.num_questions >= 20_000 else 0.1
    n_train = int(p.num_questions * (1 - val_fraction))
    small = n_train < _SMALL_DATA
    fit = (f"{n_train:,} training questions (under {_SMALL_DATA:,}), seen many times each: "
           if small else f"{n_train:,} training questions: ")
    question_find = small  # the question's find step, for small data (it costs steps, see _SMALL_DATA)
    steps_wanted = _steps_wanted(n_train, batch_size)  # the schedule's steps before the budget cap

    # --- image side
    native = max(p.image_width, p.image_height)
    if p.size_spread > 4:
        choose("warning", "image sizes", f"long sides vary {p.size_spread}x in the sample: the median "
               f"{native} px is used for all; consider resizing the images first")
    if native <= 96:
        size, stride = _round_up(native, 8), 8
        size_why = f"native {p.image_width}x{p.image_height} px, rounded up to a multiple of 8 (no resampling blur)"
    else:
        # 16-px cells; as many a side as the native size gives, but no more than lets the planned steps run in
        # the budget: a finer grid trained for fewer steps scored lower than a coarser one trained for all of
        # them (transfer-wide320 seed 0: carved validation 0.87 at step 1,355 of 2,454 on 16x16 cells, 0.99 at
        # step 2,598 of 4,000 on 12x12; docs/LOG.md)
        stride, native_side = 16, min(16, _round_up(native, 16) // 16)
        side = native_side
        while side > 8 and budget_minutes * 60 / _seconds_per_step(side * side, small) < steps_wanted:
            side -= 2
        size = side * stride
        size_why = (f"native {p.image_width}x{p.image_height} px, rounded up to a multiple of 16"
                    if side == native_side else
                    f"native {p.image_width}x{p.image_height} px, down to {size} px: a {side}x{side} grid still "
                    f"runs {steps_wanted:,} steps in the {budget_minutes:g}-min budget, "
                    f"{native_side}x{native_side} would not")
    vision = {
        "name": choose("model.vision.name", "efficientnet-lite0", "packaged ImageNet CNN, offline"),
        "image_size": choose("model.vision.image_size", size, size_why),
        "multiscale": True,
        "grid_stride": choose("model.vision.grid_stride", stride,
                              f"a {size // stride}x{size // stride} grid of {stride}-px cells"),
        "truncate": choose("model.vision.truncate", True, "mid-level features (where and what colour) "
                           "at a fraction of the full network's cost"),
        "color_stats": choose("model.vision.color_stats", True, "per-cell mean/max/min RGB: colours are named "
                              "exactly"),
        "feature_norm": True,
    }
    model = {
        "vision": vision,
        "text": {"name": choose("model.text.name", "minilm-l6", "packaged sentence encoder, offline")},
        "fusion": choose("model.fusion", "relational", "find / relate / read steps: attribute, position, "
                         "counting, comparison and relations alike"),
    }
    steps, free = (4 if p.question_words <= 12 else 5), 1
    model["reasoning_steps"] = choose("model.reasoning_steps", steps + free,
                                      f"questions average {p.question_words} words (max {p.question_words_max}): "
                                      f"{steps} steps that read the question in order, and {free} more")
    model["free_steps"] = choose(
        "model.free_steps", free, "the last step reads wherever it learns to: a step can relate to the object "
        "the ordered steps found from the question's last words (\"nearest to the green one\")")
    model["question_find"] = choose("model.question_find", question_find, fit + (
        "one more step, first, finds the object the whole question names, whatever its wording (\"is the red "
        "object in the left half?\" as well as \"which side is it on?\")" if question_find else
        "no question-driven first step: on 38,000 questions (transfer-sort75) it cost 20% of the steps and two of "
        "three seeds scored lower"))
    model["position_gate_question"] = choose(
        "model.position_gate_question", True, "position questions read where an object is found with the "
        "question's side word, whichever step read it")
    model["position_shared_axes"] = choose(
        "model.position_shared_axes", True, "x and y pass one position code map: what the left / right questions "
        "teach, \"is it in the top half?\" reads y with (with a map per axis the top-half question stayed near "
        "chance on 2 of 14 transfer-suite runs)")
    model["find_from_words"] = choose(
        "model.find_from_words", True, "each step finds from the words it read, not from a control that also holds "
        "the whole question: \"green\" finds the green object in every wording")
    model["content_read"] = choose(
        "model.content_read", True, "each ordered step also reads the words with a query the question does not "
        "set: a read the wording cannot move onto \"is\" or \"half\"")
    model["word_dropout"] = choose(
        "model.word_dropout", 0.1, "while training, each read over the words hides each word with probability "
        "0.1: a read settled on one word still learns which other word answers the question")
    model["step_read"] = choose(
        "model.step_read", False, "the head routes among the steps' reads itself: a question-weighted read over "
        "the steps (with the shared position map) cured the colour-relational stalls on transfer-sort75, but all "
        "three transfer-clutter128 seeds then left \"is the X bigger than the Y?\" near chance (docs/LOG.md)")
    model["relation_bias"] = choose(
        "model.relation_bias", True, "a later step scores cells by their distance to, and away from, what an "
        "earlier step found: nearest / farthest from a named object")
    model["hidden_size"] = choose("model.hidden_size", 64 if small else 128,
                                  fit + ("half the width, so that it learns the rule instead of memorising the "
                                         "questions" if small else "the fusion's width"))
    model["dropout"] = choose("model.dropout", 0.1 if small else 0.0,
                              fit + ("dropout in the image layer and the classifier" if small else "no dropout"))
    model["num_fusion_layers"] = choose("model.num_fusion_layers", 1 if small else 0, fit + (
        "one self-attention layer over the image cells before the steps" if small else
        "no self-attention over the cells before the steps: each step reads every cell's own features. With a "
        "layer, one run of three on transfer-clutter128 learned to overwrite each cell with other cells' content, "
        "lost its colour and plateaued at 70"))
    model.update(num_heads=4, mlp_ratio=2)
    loss = "ce" if p.agreement >= 0.75 else "bce"
    model["loss"] = choose("model.loss", loss,
                           f"humans agree with the majority answer {100 * p.agreement:.0f}% of the time: "
                           + ("cross-entropy on it" if loss == "ce" else "soft VQA scores (BCE)"))
    top_k = p.vocab_classes or min(p.num_answers, _MAX_ANSWERS)
    kept = min(p.num_answers, _MAX_ANSWERS)
    data_out = {
        "top_k_answers": choose("data.top_k_answers", top_k, (
            f"every majority answer ({p.num_answers})" if kept == p.num_answers else
            f"the {kept:,} most frequent of {p.num_answers:,} majority answers")
            + (f"; the vocabulary ranks by every human answer, so it needs {top_k:,} classes to hold them"
               if top_k > kept else "")),
        "val_fraction": choose("data.val_fraction", val_fraction,
                               "validation carved from train (whole images), for best.ckpt and vqakit tune"),
    }

    # --- schedule: passes from the dataset size, capped by the time budget
    cells = (size // stride) ** 2
    per_step = _seconds_per_step(cells, small)
    steps_budget = int(budget_minutes * 60 / per_step)
    steps = max(200, min(steps_wanted, steps_budget))
    why = (f"{steps_wanted * batch_size / n_train:.1f} passes over {n_train:,} questions"
           if steps == steps_wanted else
           f"capped by the {budget_minutes:g}-min budget at ~{per_step:.2f} s/step (wanted {steps_wanted:,})")
    train = {
        "vision": "frozen", "text": "frozen",
        "max_steps": choose("train.max_steps", steps, why),
        "batch_size": choose("train.batch_size", batch_size, "questions per step; an image's questions together"),
        "group_by_image": True,
        "lr": choose("train.lr", 0.002, "AdamW, warm-up 10% then cosine to 0 over the planned steps"),
        "warmup_ratio": 0.1,
        "weight_decay": choose("train.weight_decay", 0.05 if small else 0.01,
                               "AdamW's decoupled decay" + (", stronger for small data" if small else "")),
        "grad_clip": 1.0,
    }
    choose("train.vision / train.text", "frozen", "towers over the feature cache: every step is fusion + head")
    return AutoRecipe({"model": model, "data": data_out, "train": train}, reasons, p)


def _steps_wanted(n_train: int, batch_size: int) -> int:
    """Passes enough for small data (up to 40), fewer for large data (at least 3): ~640k questions seen."""
    epochs = min(40.0, max(3.0, 640_000 / max(n_train, 1)))
    return int(epochs * n_train / batch_size)


def _seconds_per_step(cells: int, small: bool = False) -> float:
    """Linear between the measured grid sizes, proportional to the cells beyond the largest. ``small``: the
    small-data recipe (one self-attention layer over the cells, the question's find step: ``_QUESTION_FIND_COST``)."""
    table = _SECONDS_PER_STEP_IMAGE_LAYER if small else _SECONDS_PER_STEP
    known = sorted(table)
    if cells > known[-1]:
        base = table[known[-1]] * cells / known[-1]
    else:  # np.interp holds the first value below the smallest grid
        base = float(np.interp(cells, known, [table[k] for k in known]))
    return base * (_QUESTION_FIND_COST if small else 1.0)
