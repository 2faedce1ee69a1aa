"""Batches: soft targets, majority labels, cached vs raw inputs; seeded splits."""

from __future__ import annotations


import pytest
import torch

from vqakit.data.answers import AnswerVocab
from vqakit.data.config import DataConfig, limit_questions, load_split, split_validation
from vqakit.data.example import Example
from vqakit.towers.text import load_tokenizer
from vqakit.towers.processor import VQAProcessor
from vqakit.train.datamodule import VQACollator, VQADataset


def _examples(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    return [
        Example(str(path), "what color is it?", 1, 7, ["red"] * 7 + ["Red", "orange", "pink"], "other"),
        Example(str(path), "is it red?", 2, 7, ["yes"] * 2 + ["no"] * 8, "yes/no"),
        Example(str(path), "what is it?", 3, 7, ["zebra"] * 10, "other"),
    ]


def test_targets_and_labels(tmp_path, tiny_text_tower):
    examples = _examples(tmp_path)
    vocab = AnswerVocab.build([e.answers for e in examples[:2]])
    processor = VQAProcessor(32, [0.5] * 3, [0.5] * 3, load_tokenizer(tiny_text_tower))
    ds = VQADataset(examples, vocab, processor)
    batch = VQACollator(processor)([ds[i] for i in range(3)])
    red, orange, yes, no = (vocab.encode(a) for a in ("red", "orange", "yes", "no"))
    assert batch["targets"][0, red] == 1.0  # 8 humans (normalised "Red" counts) -> min(8 / 3, 1)
    assert abs(batch["targets"][0, orange] - 1 / 3) < 1e-6
    assert abs(batch["targets"][1, yes] - 2 / 3) < 1e-6 and batch["targets"][1, no] == 1.0
    assert batch["targets"][2].sum() == 0 and batch["labels"].tolist() == [red, no, -100]  # zebra: out of vocab
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["input_ids"].shape[0] == 3


def test_validation_split_and_limits_keep_whole_images_and_are_seeded():
    examples = load_split(DataConfig(limit=200), "train")
    assert len(examples) >= 200 and len({e.image_id for e in examples}) < len(examples)
    assert [e.question_id for e in load_split(DataConfig(limit=200), "train")] == [e.question_id for e in examples]
    train, val = split_validation(examples, 0.2, seed=0)
    assert not {e.image_id for e in train} & {e.image_id for e in val}
    assert len(train) + len(val) == len(examples) and val
    other = limit_questions(load_split(DataConfig(), "train"), 200, seed=1)
    assert {e.image_id for e in other} != {e.image_id for e in examples}


def test_train_image_fraction_samples_whole_images_on_any_source():
    examples = load_split(DataConfig(train_image_fraction=0.1, seed=3), "train")
    images = {e.image_id for e in examples}
    assert len(images) == 400  # of easy-VQA's 4,000 training images
    per_image = {}
    for e in load_split(DataConfig(), "train"):
        per_image[e.image_id] = per_image.get(e.image_id, 0) + 1
    assert len(examples) == sum(per_image[i] for i in images)  # every question of a kept image
    assert images != {e.image_id for e in load_split(DataConfig(train_image_fraction=0.1, seed=4), "train")}


def test_questions_per_image_caps_each_training_image_and_is_seeded():
    full = load_split(DataConfig(), "train")
    per_image = {}
    for e in full:
        per_image[e.image_id] = per_image.get(e.image_id, 0) + 1
    capped = load_split(DataConfig(questions_per_image=2, seed=5), "train")
    kept = {}
    for e in capped:
        kept[e.image_id] = kept.get(e.image_id, 0) + 1
    assert kept == {i: min(2, n) for i, n in per_image.items()}  # every image stays, at most 2 questions each
    ids = [e.question_id for e in capped]
    assert ids == [e.question_id for e in load_split(DataConfig(questions_per_image=2, seed=5), "train")]
    assert ids != [e.question_id for e in load_split(DataConfig(questions_per_image=2, seed=6), "train")]
    order = {e.question_id: i for i, e in enumerate(full)}
    assert ids == sorted(ids, key=order.__getitem__)  # original order
    test = load_split(DataConfig(questions_per_image=1), "test")  # evaluation splits are never capped
    assert len(test) == len(load_split(DataConfig(), "test"))
    with pytest.raises(ValueError, match="questions_per_image=0"):
        DataConfig(questions_per_image=0)


def test_collator_can_stack_each_image_once(tmp_path, tiny_text_tower):
    from PIL import Image

    examples = _examples(tmp_path)
    other = tmp_path / "other.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(other)
    examples.insert(1, Example(str(other), "what color is it?", 4, 8, ["blue"] * 10, "other"))
    vocab = AnswerVocab.build([e.answers for e in examples])
    processor = VQAProcessor(32, [0.5] * 3, [0.5] * 3, load_tokenizer(tiny_text_tower))
    ds = VQADataset(examples, vocab, processor)
    items = [ds[i] for i in range(4)]  # images: red, blue, red, red
    shared = VQACollator(processor, share_images=True)(items)
    plain = VQACollator(processor)(items)
    assert shared["pixel_values"].shape == (2, 3, 32, 32) and shared["image_index"].tolist() == [0, 1, 0, 0]
    torch.testing.assert_close(shared["pixel_values"][shared["image_index"]], plain["pixel_values"])
    assert "image_index" not in plain


def test_grouped_sampler_keeps_images_together_and_is_resumable():
    from vqakit.train.datamodule import EpochShuffleSampler

    groups = [i % 7 for i in range(50)]  # 7 images, 7-8 questions each, interleaved
    sampler = EpochShuffleSampler(50, seed=3, groups=groups)
    first, second = list(sampler), list(sampler)
    for order in (first, second):
        assert sorted(order) == list(range(50))
        seen = [groups[i] for i in order]
        runs = [g for j, g in enumerate(seen) if j == 0 or seen[j - 1] != g]
        assert len(runs) == 7  # each image's questions are consecutive
    assert first != second  # a fresh order every epoch
    resumed = EpochShuffleSampler(50, seed=3, groups=groups)
    it = iter(resumed)
    head = [next(it) for _ in range(20)]
    state = resumed.state_dict()
    again = EpochShuffleSampler(50, seed=3, groups=groups)
    again.load_state_dict(state)
    assert head + list(again) == first


@pytest.mark.parametrize("batch_size", [10, 16])  # 40 questions: 4 full batches; 2 and a partial one
def test_every_epoch_is_a_full_pass_also_when_the_batch_size_divides_the_data(batch_size):
    """A batch sampler stops pulling indices once it has len(sampler) of them, so the sampler's generator never
    runs past its last index when the batch size divides the data; the next pass must still be a full one
    (it was empty: an epoch of no steps, and a run stopped by max_epochs after half its planned steps)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from vqakit.train.datamodule import EpochShuffleSampler

    sampler = EpochShuffleSampler(40, seed=1, groups=[i // 4 for i in range(40)])
    loader = StatefulDataLoader(list(range(40)), batch_size=batch_size, sampler=sampler)
    passes = []
    for _ in range(3):
        it = iter(loader)
        passes.append([int(i) for _ in range(len(loader)) for i in next(it)])  # as Lightning reads an epoch
    assert [sorted(p) for p in passes] == [list(range(40))] * 3
    assert len({tuple(p) for p in passes}) == 3  # a fresh order each epoch
    fresh = EpochShuffleSampler(40, seed=1, groups=[i // 4 for i in range(40)])
    assert [list(fresh) for _ in range(3)] == passes  # the same orders as a sampler read to its end
