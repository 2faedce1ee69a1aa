"""The feature-cache folders of a config are what the code of the flat tower fields named them: caches built
before the tower options were nested stay valid (the expected names were computed with that code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vqakit.data.features import image_cache_namespace, text_cache_namespace

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_flat_checkpoints_keep_their_cache_folders():
    from vqakit.models.two_tower import TwoTowerForQuestionAnswering

    for name in ("two_tower_v1", "two_tower_v2"):
        model = TwoTowerForQuestionAnswering.from_pretrained(FIXTURES / name)
        assert image_cache_namespace(model.config, model.backbone.vision) == "vision-tiny-vit-32-ba265b3e890da4c8"
        assert (text_cache_namespace(model.config, model.backbone.text, "fixed-tokenizer")
                == "text-tiny-bert-16-a5b79bf6e9571065")


@pytest.mark.parametrize("flat, image, text", [
    ({"image_size": 128, "vision_multiscale": True, "vision_grid_stride": 16, "vision_truncate": True,
      "vision_color_stats": True, "vision_feature_norm": True, "max_question_length": 24},
     "vision-efficientnet-lite0-128-475811b142377b6f", "text-minilm-l6-24-85ee0aa9e5c8f621"),
])
def test_packaged_towers_keep_their_cache_folders(flat, image, text):
    from vqakit.models.two_tower import TwoTowerConfig, TwoTowerForQuestionAnswering

    config = TwoTowerConfig.from_dict({**flat, "id2label": {0: "yes", 1: "no"}})
    model = TwoTowerForQuestionAnswering(config).eval()
    assert image_cache_namespace(config, model.backbone.vision) == image
    assert text_cache_namespace(config, model.backbone.text, "fixed-tokenizer") == text
