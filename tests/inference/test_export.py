"""ONNX export: verified against PyTorch, and the predictor's onnx backend answers like the torch one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqakit.inference.export import export_onnx
from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.inference.onnx_runtime import pad_questions
from vqakit.inference.predict import VQAPredictor
from vqakit.towers.text import load_tokenizer

pytest.importorskip("onnxruntime")


@pytest.fixture(params=[{}, {"fusion": "spatial", "grid_stride": 16},
                        {"fusion": "relational", "grid_stride": 16, "relation_bias": True, "question_find": True,
                         "position_gate_question": True, "position_shared_axes": True, "step_read": True,
                         "num_fusion_layers": 0}],
                ids=["cross-attention", "spatial", "relational"])
def checkpoint(request, tiny_config, tiny_text_tower, tmp_path):
    torch.manual_seed(0)
    options = dict(request.param)
    vision = {"name": "efficientnet-lite0", "image_size": 64, "multiscale": True,
              **({"grid_stride": options.pop("grid_stride")} if "grid_stride" in options else {})}
    model = TwoTowerForQuestionAnswering(tiny_config(vision=vision, **{"num_fusion_layers": 2, **options}))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=load_tokenizer(tiny_text_tower))
    return tmp_path / "ckpt"


def test_export_writes_verified_parts(checkpoint):
    out = export_onnx(checkpoint)
    assert {p.name for p in out.iterdir()} == {"vision.onnx", "text.onnx", "head.onnx", "export.json"}
    info = json.loads((out / "export.json").read_text())
    assert all(d <= 1e-4 for d in info["max_abs_diff"].values())


def test_onnx_backend_matches_torch(checkpoint, tmp_path):
    export_onnx(checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    questions = ["what is the color of the shape?", "is there a red circle?", "how many?"]
    fast = VQAPredictor.from_pretrained(checkpoint)  # auto: the exported files are there
    slow = VQAPredictor.from_pretrained(checkpoint, backend="torch")
    assert fast.backend == "onnx" and slow.backend == "torch"
    for a, b in zip(fast.predict(tmp_path / "img.png", questions), slow.predict(tmp_path / "img.png", questions)):
        assert a.answer == b.answer and abs(a.score - b.score) < 1e-4
        assert [x for x, _ in a.top_k] == [x for x, _ in b.top_k]
    with_maps = fast.predict(tmp_path / "img.png", questions[0], output_attentions=True)[0]
    side = 64 // json.loads((checkpoint / "config.json").read_text())["vision"]["grid_stride"]
    assert with_maps.attention.shape == (side, side)  # attention maps come from the torch model


def test_pad_questions():
    states, mask = pad_questions(np.ones((2, 3, 4), np.float32), np.array([[1, 1, 1], [1, 1, 0]]), 5)
    assert states.shape == (2, 5, 4) and states[:, 3:].sum() == 0 and mask.tolist()[1] == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="max_question_length"):
        pad_questions(np.ones((1, 6, 4)), np.ones((1, 6)), 5)


def test_unknown_backend(checkpoint):
    with pytest.raises(ValueError, match="backend"):
        VQAPredictor.from_pretrained(checkpoint, backend="tensorrt")
