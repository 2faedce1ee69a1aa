"""Dataset and LightningDataModule: examples -> batches of model inputs and VQA targets.

Each modality comes either from the feature cache (frozen tower: ``image_features`` / ``text_features``)
or raw (trained tower: ``pixel_values`` / ``input_ids``). Targets are the soft scores over the answer
vocabulary (``min(humans / 3, 1)``) and the majority answer's id (-100 when out of vocabulary).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from vqakit.data.answers import AnswerVocab
from vqakit.data.cache import FeatureCache
from vqakit.data.example import Example


class VQADataset(Dataset):
    def __init__(
        self,
        examples: list[Example],
        vocab: AnswerVocab,
        processor,
        image_cache: FeatureCache | None = None,
        image_keys: list[str] | None = None,
        text_cache: FeatureCache | None = None,
        text_keys: list[str] | None = None,
    ):
        self.examples = examples
        self.processor = processor
        self.image_cache, self.image_keys = image_cache, image_keys
        self.text_cache, self.text_keys = text_cache, text_keys
        self.num_answers = len(vocab)
        self.scores = [vocab.soft_scores(e.answers) for e in examples]
        self.labels = []
        for e in examples:
            label = vocab.encode(vocab.majority(e.answers)) if e.answers else None
            self.labels.append(-100 if label is None else label)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        image_key = self.image_keys[i] if self.image_cache is not None else e.image
        item = {"index": i, "question_id": e.question_id, "label": self.labels[i], "image_key": image_key}
        target = torch.zeros(self.num_answers)
        for answer_id, score in self.scores[i].items():
            target[answer_id] = score
        item["target"] = target
        if self.image_cache is not None:
            item["image_features"] = torch.from_numpy(np.array(self.image_cache.get(self.image_keys[i], "tokens")))
        else:
            item["pixel_values"] = self.processor.image(e.image)
        if self.text_cache is not None:
            key = self.text_keys[i]
            item["text_features"] = torch.from_numpy(np.array(self.text_cache.get(key, "states")))
            item["attention_mask"] = torch.from_numpy(np.array(self.text_cache.get(key, "mask"))).long()
        else:
            item["question"] = e.question
        return item


class VQACollator:
    """Stacks items; tokenizes raw questions; trims cached question states to the batch's longest.

    ``share_images=True`` stacks each distinct image of the batch once and adds ``image_index`` (B,), the
    row of each question's image, so the model runs the image side once per image (``TwoTowerModel``)."""

    def __init__(self, processor, share_images: bool = False):
        self.processor = processor
        self.share_images = share_images

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "index": torch.tensor([it["index"] for it in items]),
            **({"question_id": torch.tensor([it["question_id"] for it in items])} if "question_id" in items[0] else {}),
            "labels": torch.tensor([it["label"] for it in items]),
            "targets": torch.stack([it["target"] for it in items]),
        }
        images = items
        if self.share_images:
            rows: dict = {}
            batch["image_index"] = torch.tensor([rows.setdefault(it["image_key"], len(rows)) for it in items])
            first = {}
            for it in items:
                first.setdefault(it["image_key"], it)
            images = list(first.values())
        for key in ("image_features", "pixel_values"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in images])
        if "question" in items[0]:
            batch.update(self.processor.text([it["question"] for it in items]))
        else:
            mask = torch.stack([it["attention_mask"] for it in items])
            length = int(mask.sum(1).max())
            batch["attention_mask"] = mask[:, :length]
            batch["text_features"] = torch.stack([it["text_features"] for it in items])[:, :length]
        return batch


MODEL_INPUTS = ("pixel_values", "image_features", "input_ids", "attention_mask", "text_features", "image_index")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch, a pure function of ``(seed, epoch)``, resumable mid-epoch.

    ``StatefulDataLoader`` saves ``state_dict()`` (epoch and position) in each checkpoint; after
    ``load_state_dict`` the next epoch starts at the saved position of the same permutation, and the
    following epochs get the permutations an uninterrupted run would have drawn.

    ``groups`` (one image id per example) keeps each image's examples together: the images come in a fresh
    order every epoch, each followed by its examples in a fresh order, so a batch holds whole images (the
    image side of a model that shares it runs once for all of an image's questions).
    """

    def __init__(self, num_samples: int, seed: int = 0, groups: list | None = None):
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.position = 0, 0
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"groups has {len(groups)} entries for {num_samples} samples")
        self.members = None
        if groups is not None:
            members: dict = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            self.members = [torch.tensor(m) for m in members.values()]

    def __len__(self) -> int:
        return self.num_samples

    def _order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        if self.members is None:
            return torch.randperm(self.num_samples, generator=gen)
        return torch.cat([m[torch.randperm(len(m), generator=gen)]
                          for m in (self.members[j] for j in torch.randperm(len(self.members), generator=gen))])

    def __iter__(self):
        if self.position >= self.num_samples:
            # the last pass was read to its end but its generator never resumed past the last index (a batch
            # sampler stops asking once it has len(sampler) indices, when the batch size divides them), so
            # the epoch was not rolled over there: do it now, or this pass would be empty
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        while self.position < self.num_samples:
            self.position += 1
            yield int(order[self.position - 1])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class VQADataModule(L.LightningDataModule):
    def __init__(self, train_set: VQADataset, val_set: VQADataset | None, batch_size: int, num_workers: int = 0,
                 eval_batch_size: int = 256, seed: int = 0, group_by_image: bool = False,
                 share_images: bool = False):
        super().__init__()
        self.seed = seed
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.group_by_image = group_by_image
        self.collate = VQACollator(train_set.processor, share_images=share_images)

    def train_dataloader(self) -> StatefulDataLoader:
        # stateful: Lightning stores its position (and shuffle order) in checkpoints, so a resumed run
        # continues mid-epoch exactly where the checkpoint was taken
        # Neither the shuffling (the sampler's) nor the workers' base seed (the loader's generator) draws
        # from the global RNG, which dropout uses and which a resumed run restores from the checkpoint.
        groups = [e.image_id for e in self.train_set.examples] if self.group_by_image else None
        return StatefulDataLoader(self.train_set, batch_size=self.batch_size,
                                  sampler=EpochShuffleSampler(len(self.train_set), self.seed, groups=groups),
                                  generator=torch.Generator().manual_seed(self.seed),
                                  collate_fn=self.collate, num_workers=self.num_workers,
                                  persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        if not self.val_set:
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
