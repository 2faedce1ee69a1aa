"""One preprocessing path for training, feature caching, evaluation and serving (CLIP's ``preprocess``).

Images: any input ``load_image`` accepts -> RGB -> resized to ``image_size`` squared (bilinear) ->
scaled to [0, 1] -> normalised with the vision tower's mean/std. Questions: the text tower's tokenizer,
padded to the longest in the batch and truncated to ``max_question_length`` (the model config's ``text.max_length``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqakit.data.images import load_image
from vqakit.towers.text import load_tokenizer


class VQAProcessor:
    """Turns images and questions into model inputs.

    >>> import numpy as np
    >>> p = VQAProcessor(image_size=32, image_mean=[0.5] * 3, image_std=[0.5] * 3, tokenizer=None)
    >>> p.images([np.zeros((8, 8, 3), dtype=np.uint8)]).shape
    torch.Size([1, 3, 32, 32])
    """

    def __init__(self, image_size: int, image_mean, image_std, tokenizer, max_question_length: int = 32):
        self.image_size = image_size
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.tokenizer = tokenizer
        self.max_question_length = max_question_length

    @classmethod
    def from_config(cls, config, tokenizer_dir: str | Path | None = None) -> "VQAProcessor":
        """From a ``TwoTowerConfig``; the tokenizer from ``tokenizer_dir`` (a checkpoint's ``text_tower/``)."""
        tokenizer = load_tokenizer(str(tokenizer_dir) if tokenizer_dir is not None else config.text.name)
        return cls(config.vision.image_size, config.image_mean, config.image_std, tokenizer, config.text.max_length)

    def image(self, source) -> torch.Tensor:
        """One image (path, bytes, PIL, numpy) -> (3, S, S) float tensor."""
        img = load_image(source)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def images(self, sources) -> torch.Tensor:
        return torch.stack([self.image(s) for s in sources])  # (B, 3, S, S)

    def text(self, questions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(questions), padding=True, truncation=True, max_length=self.max_question_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, save_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(Path(save_dir) / "text_tower")
