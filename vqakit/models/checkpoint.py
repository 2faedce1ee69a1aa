"""A model config's ``config.json``: written and read once for every model family.

Each family's config dataclass inherits :class:`ConfigMixin` and sets ``model_type``. The mixin has no dataclass
fields, so a config's CLI arguments (jsonargparse builds them from the fields) are exactly the family's own; it
adds ``to_dict`` / ``from_dict`` (an unknown field fails naming the file and the field) and the
``config.json`` I/O of ``save_pretrained`` / ``from_pretrained``. A family whose older checkpoints lack or name
fields differently overrides :meth:`ConfigMixin.upgrade` (transformers' ``PretrainedConfig`` to/from dict and
``_patch_missing_keys``, written once) and, for renamed fields, :meth:`ConfigMixin.upgrade_keys`, which the CLI
also applies to the family's section of a YAML recipe written by an earlier version.

>>> from dataclasses import dataclass
>>> @dataclass
... class TinyConfig(ConfigMixin):
...     model_type = "tiny"
...     width: int = 8
>>> TinyConfig(width=4).to_dict()
{'model_type': 'tiny', 'width': 4}
>>> TinyConfig.from_dict({"model_type": "tiny", "widht": 4})
Traceback (most recent call last):
    ...
ValueError: config.json has unknown fields ['widht']; known fields = ['width']
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, TypeVar

from vqakit.models.checkpoint_files import read_config_json

CONFIG_NAME = "config.json"
# keys config.json may hold besides the fields: the family, and a version stamp (accepted, not used)
FILE_KEYS = frozenset({"model_type", "vqakit_version"})

C = TypeVar("C", bound="ConfigMixin")


@dataclass
class ConfigMixin:
    """``to_dict`` / ``from_dict`` and ``config.json`` I/O for a model family's config dataclass (no fields)."""

    model_type: ClassVar[str]  # what config.json's "model_type" says; the registry maps it back to the family

    def to_dict(self) -> dict:
        """``{"model_type": ..., **fields}``: what ``config.json`` holds."""
        return {"model_type": self.model_type, **asdict(self)}

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """``d`` (a copy of a ``config.json``) as the current fields: fill or rename what older checkpoints wrote
        differently. The default renames with :meth:`upgrade_keys`."""
        return cls.upgrade_keys(d)

    @classmethod
    def upgrade_keys(cls, d: dict) -> dict:
        """``d``, possibly partial (a YAML recipe's section of this config), with fields that earlier versions
        named differently renamed; no defaults are filled. The default keeps it as is."""
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict, source: str | Path = CONFIG_NAME) -> C:
        """The config of a ``config.json`` dict, after :meth:`upgrade`; ``ValueError`` naming ``source`` and every
        field this version does not know."""
        d = cls.upgrade(dict(d))
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - FILE_KEYS
        if unknown:
            raise ValueError(f"{source} has unknown fields {sorted(unknown)}; known fields = {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save_json(self, save_dir: str | Path, **overrides) -> Path:
        """Write ``save_dir/config.json`` (``overrides`` replace fields in the file only)."""
        path = Path(save_dir) / CONFIG_NAME
        path.write_text(json.dumps({**self.to_dict(), **overrides}, indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls: type[C], checkpoint_dir: str | Path) -> C:
        """The config in ``checkpoint_dir/config.json`` (errors name the file)."""
        path = Path(checkpoint_dir) / CONFIG_NAME
        return cls.from_dict(read_config_json(path), source=path)


# the flat tower fields of the earlier TwoTowerConfig, GRUDecoderConfig and LLMPrefixConfig -> (their nested tower
# config, its field): ``vision_grid_stride`` is now ``vision.grid_stride``
FLAT_TOWER_KEYS = {
    "vision_tower": ("vision", "name"),
    "image_size": ("vision", "image_size"),
    "vision_multiscale": ("vision", "multiscale"),
    "vision_grid_stride": ("vision", "grid_stride"),
    "vision_truncate": ("vision", "truncate"),
    "vision_color_stats": ("vision", "color_stats"),
    "vision_feature_norm": ("vision", "feature_norm"),
    "text_tower": ("text", "name"),
    "max_question_length": ("text", "max_length"),
    "text_pooler": ("text", "pooler"),
}


def nest_tower_keys(d: dict, keys: dict[str, tuple[str, str]] = FLAT_TOWER_KEYS) -> dict:
    """``d`` (a config dict or a YAML recipe's model section, possibly partial) with the flat tower ``keys``
    moved into its ``vision`` / ``text`` dicts; ``ValueError`` if a flat key and its nested one disagree.

    >>> nest_tower_keys({"vision_grid_stride": 16, "fusion": "spatial", "vision": {"truncate": True}})
    {'fusion': 'spatial', 'vision': {'truncate': True, 'grid_stride': 16}}
    """
    d = dict(d)
    for old, (tower, name) in keys.items():
        if old not in d:
            continue
        value = d.pop(old)
        nested = dict(d.get(tower) or {})
        if name in nested and nested[name] != value:
            raise ValueError(f"{old}={value!r} (the earlier name of {tower}.{name}) disagrees with "
                             f"{tower}.{name}={nested[name]!r}; give {tower}.{name} only")
        nested[name] = value
        d[tower] = nested
    return d


def as_config(value, cls, flag: str = ""):
    """A (nested) config dataclass from itself or from the dict of its fields (``config.json``, a YAML section);
    the errors of its checks name the option under ``flag`` (``--model.vision``)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{flag}: expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    if set(value) - known:
        raise ValueError(f"{flag}: {cls.__name__} has no fields {sorted(set(value) - known)}; known fields = "
                         f"{sorted(known)}")
    try:
        return cls(**value)
    except (ValueError, NotImplementedError) as err:  # "grid_stride=12 is not ..." -> "--model.vision.grid_stride=12"
        raise type(err)(f"{flag}.{err}" if flag else str(err)) from None
