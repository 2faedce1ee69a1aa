"""``ConfigMixin``: every family's config writes and reads ``config.json`` the same way."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vqakit.models.checkpoint import ConfigMixin
from vqakit.models.registry import MODEL_FAMILIES

FAMILIES = list(MODEL_FAMILIES.values())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_every_config_round_trips_through_config_json(family, tmp_path):
    cls = family.config_class()
    assert issubclass(cls, ConfigMixin) and cls.model_type == family.model_type
    assert "model_type" not in {f.name for f in dataclasses.fields(cls)}  # a class constant, not a CLI flag
    config = cls()
    path = config.save_json(tmp_path)
    assert json.loads(path.read_text()) == config.to_dict()
    assert cls.from_json(tmp_path) == config
    with pytest.raises(ValueError, match=r"config.json has unknown fields \['not_a_field'\]; known fields = \["):
        cls.from_dict({**config.to_dict(), "not_a_field": 1}, source=path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "not_a_field": 1}))
        cls.from_json(tmp_path)


def test_upgrade_fills_what_older_two_tower_checkpoints_lack():
    from vqakit.models.two_tower import TwoTowerConfig

    old = {k: v for k, v in TwoTowerConfig().to_dict().items()
           if not k.startswith("vision_") or k == "vision_tower"}
    old.pop("position_readout")
    config = TwoTowerConfig.from_dict(old)
    assert config.position_readout is False and config.vision_grid_stride == 32 and not config.vision_truncate
