"""Tower configs own their options: each checks them against its tower; the models hold them as nested fields
(``vision``, ``text``), and old flat ``config.json`` files keep loading into them."""

from __future__ import annotations

import typing

import pytest

from vqakit.models.two_tower import TwoTowerConfig
from vqakit.towers.text import TextTowerConfig
from vqakit.towers.vision import VisionTowerConfig


def test_two_tower_config_holds_its_tower_configs():
    cfg = TwoTowerConfig.from_dict({"image_size": 128, "vision_multiscale": True, "vision_grid_stride": 16,
                                    "vision_truncate": True, "vision_color_stats": True, "vision_feature_norm": True,
                                    "max_question_length": 20, "text_pooler": "cls"})  # the flat layout
    assert cfg.vision == VisionTowerConfig("efficientnet-lite0", 128, multiscale=True, grid_stride=16,
                                           truncate=True, color_stats=True, feature_norm=True)
    assert cfg.text == TextTowerConfig("minilm-l6", max_length=20, pooler="cls")
    assert cfg.to_dict()["vision"]["grid_stride"] == 16 and "vision_grid_stride" not in cfg.to_dict()
    assert TwoTowerConfig(vision={"grid_stride": 16}).vision == VisionTowerConfig(grid_stride=16)


@pytest.mark.parametrize("option, match", [
    ({"grid_stride": 16}, "grid_stride=16 is implemented for"),
    ({"truncate": True}, "truncate=True is implemented for"),
    ({"color_stats": True}, "color_stats=True is implemented for"),
    ({"multiscale": True}, "multiscale features are implemented for"),
])  # fmt: skip
def test_efficientnet_options_on_a_hugging_face_tower_name_the_option(option, match):
    with pytest.raises(NotImplementedError, match=match):
        VisionTowerConfig("google/vit-base-patch16-224", **option)
    with pytest.raises(NotImplementedError, match="--model.vision." + match):  # a model config's, naming the flag
        TwoTowerConfig(vision={"name": "google/vit-base-patch16-224", **option})
    VisionTowerConfig("google/vit-base-patch16-224", feature_norm=True)  # the model's, for any tower


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"grid_stride=12 is not one of \(8, 16, 32\)"):
        VisionTowerConfig(grid_stride=12)
    with pytest.raises(ValueError, match="truncate=True needs grid_stride 8 or 16"):
        VisionTowerConfig(truncate=True)
    with pytest.raises(ValueError, match=r"pooler='max' is not one of \('mean', 'cls'\)"):
        TextTowerConfig(pooler="max")
    with pytest.raises(ValueError, match=r"--model.fusion='bilinear' is not one of \('concat', "):
        TwoTowerConfig(fusion="bilinear")
    with pytest.raises(ValueError, match=r"--model.loss='mse' is not one of \('bce', 'ce'\)"):
        TwoTowerConfig(loss="mse")


def test_choices_are_literal_types_the_cli_shows():
    hints = typing.get_type_hints(TwoTowerConfig)
    for name in ("fusion", "loss"):
        assert typing.get_origin(hints[name]) is typing.Literal, name
    assert hints["vision"] is VisionTowerConfig and hints["text"] is TextTowerConfig
    assert typing.get_origin(typing.get_type_hints(TextTowerConfig)["pooler"]) is typing.Literal
    assert typing.get_args(typing.get_type_hints(VisionTowerConfig)["grid_stride"]) == (8, 16, 32)
