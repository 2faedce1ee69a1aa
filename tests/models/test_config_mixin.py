"""``ConfigMixin``: every family's config writes and reads ``config.json`` the same way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    from vqakit.towers.text import TextTowerConfig
    from vqakit.towers.vision import VisionTowerConfig

    old = {k: v for k, v in TwoTowerConfig().to_dict().items() if k not in ("vision", "text", "position_readout")}
    old.update(vision_tower="efficientnet-lite0", text_tower="minilm-l6", image_size=224, max_question_length=32,
               text_pooler="mean")  # the flat layout, before vision_multiscale and the later vision options
    config = TwoTowerConfig.from_dict(old)
    assert config.position_readout is False and config.vision.grid_stride == 32 and not config.vision.truncate
    assert config.vision == VisionTowerConfig() and config.text == TextTowerConfig()


FLAT_CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "flat_configs"


def test_flat_gru_decoder_config_reads_as_the_same_settings():
    """A GRU decoder's config.json of the flat layout (written by that code, with the encoder settings it
    implied): the same towers and encoder, and it saves in the nested layout."""
    from vqakit.models.gru_decoder import GRUDecoderConfig
    from vqakit.models.two_tower import TwoTowerConfig

    written = json.loads((FLAT_CONFIGS / "gru_decoder.json").read_text())
    config = GRUDecoderConfig.from_dict(written["config"])
    assert config.backbone_config() == TwoTowerConfig.from_dict(written["backbone"])
    assert (config.vision.name, config.vision.image_size, config.vision.multiscale) == ("tiny-vit", 32, False)
    assert (config.text.max_length, config.text.pooler) == (16, "cls") and config.vocab == written["config"]["vocab"]
    assert "vision_tower" not in config.to_dict() and GRUDecoderConfig.from_dict(config.to_dict()) == config


def test_flat_llm_prefix_config_reads_as_the_same_vision_tower():
    from vqakit.models.llm_prefix import LLMPrefixConfig
    from vqakit.towers.vision import VisionTowerConfig

    written = json.loads((FLAT_CONFIGS / "llm_prefix.json").read_text())
    config = LLMPrefixConfig.from_dict(written["config"])
    assert config.vision == VisionTowerConfig(**written["vision"])
    assert config.prompt == written["config"]["prompt"] and LLMPrefixConfig.from_dict(config.to_dict()) == config


def test_flat_and_nested_keys_that_disagree_are_an_error():
    from vqakit.models.two_tower import TwoTowerConfig

    with pytest.raises(ValueError, match=r"vision_grid_stride=16 \(the earlier name of vision.grid_stride\)"):
        TwoTowerConfig.from_dict({"vision_grid_stride": 16, "vision": {"grid_stride": 8}})
    assert TwoTowerConfig.from_dict({"vision_grid_stride": 16, "vision": {"grid_stride": 16}}).vision.grid_stride == 16
    with pytest.raises(ValueError, match=r"--model.vision: VisionTowerConfig has no fields \['stride'\]"):
        TwoTowerConfig.from_dict({"vision": {"stride": 16}})


def test_old_dotted_names_and_recipes_are_upgraded():
    from vqakit.models.registry import upgrade_dotted_key, upgrade_recipe

    assert [upgrade_dotted_key(k) for k in ("model.vision_tower", "model.max_question_length", "gru.text_pooler",
                                            "llm.vision_multiscale", "llm.text_tower", "vlm.max_question_length",
                                            "train.lr", "model.vision.grid_stride")] == [
        "model.vision.name", "model.text.max_length", "gru.text.pooler", "llm.vision.multiscale", "llm.text_tower",
        "vlm.max_question_length", "train.lr", "model.vision.grid_stride"]
    recipe, renamed = upgrade_recipe({"model": {"image_size": 128, "text_pooler": "cls", "fusion": "gated"},
                                      "vlm": {"image_size": 32}, "data": {"limit": 4}})
    assert recipe == {"model": {"vision": {"image_size": 128}, "text": {"pooler": "cls"}, "fusion": "gated"},
                      "vlm": {"image_size": 32}, "data": {"limit": 4}}
    assert renamed == [("model.image_size", "model.vision.image_size"), ("model.text_pooler", "model.text.pooler")]

