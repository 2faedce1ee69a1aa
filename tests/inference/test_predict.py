"""VQAPredictor: every image input kind, many questions per image, batches of images, INT8 quantization,
dispatch on the checkpoint's model_type."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vqakit.inference import predict as predict_module
from vqakit.inference.predict import VQAPredictor
from vqakit.models import registry

QUESTIONS = ["what is the color of the shape?", "is there a red circle?", "how many shapes?"]


def _image(seed: int, size=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch_predictor(tiny_checkpoint):
    return VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch")


def _same(a, b, atol=1e-5):
    assert [p.question for p in a] == [p.question for p in b]
    for x, y in zip(a, b):
        assert x.answer == y.answer and abs(x.score - y.score) < atol
        n = min(len(x.top_k), len(y.top_k))
        assert [label for label, _ in x.top_k[:n]] == [label for label, _ in y.top_k[:n]]


def test_every_image_input_kind_gives_the_same_answer(torch_predictor, tmp_path):
    array = _image(0)
    Image.fromarray(array).save(tmp_path / "img.png")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    reference = torch_predictor.predict(array, QUESTIONS)
    assert len(reference) == 3 and all(len(p.top_k) == 5 for p in reference)
    for source in (tmp_path / "img.png", str(tmp_path / "img.png"), Image.fromarray(array), buf.getvalue()):
        _same(torch_predictor.predict(source, QUESTIONS), reference)
    one = torch_predictor.predict(array, QUESTIONS[1], top_k=2)
    assert len(one) == 1 and len(one[0].top_k) == 2
    _same(one, reference[1:2])


def test_batch_encodes_each_image_once_and_matches_single_calls(torch_predictor):
    images = [_image(1), _image(2, (64, 64)), _image(3, (20, 90))]
    questions = [QUESTIONS, QUESTIONS[2], QUESTIONS[:2]]
    calls = []
    vision = torch_predictor.model.backbone.vision
    handle = vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        batched = torch_predictor.predict_batch(images, questions)
    finally:
        handle.remove()
    assert calls == [3]  # one vision forward pass over the three images, not one per question
    assert [len(r) for r in batched] == [3, 1, 2]
    for image, qs, got in zip(images, questions, batched):
        _same(got, torch_predictor.predict(image, qs))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_question_cache_gives_the_same_answers(tiny_checkpoint, tmp_path, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    plain = VQAPredictor.from_pretrained(ckpt, device="cpu", backend=backend)
    cached = VQAPredictor.from_pretrained(ckpt, device="cpu", backend=backend, question_cache=2)
    images = [_image(10), _image(11)]
    questions = [[QUESTIONS[0], QUESTIONS[1]], [QUESTIONS[1], "is there a circle?"]]
    first = cached.predict_batch(images, questions)
    assert cached.question_cache.misses == 3 and cached.question_cache.hits == 0  # each distinct question once
    assert len(cached.question_cache) == 2  # LRU: the oldest of three fell out
    again = cached.predict_batch(images, questions)
    assert cached.question_cache.hits == 2
    for got in (first, again):
        for a, b in zip(got, plain.predict_batch(images, questions)):
            _same(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="question cache size"):
        VQAPredictor.from_pretrained(ckpt, backend="torch", question_cache=-1)


def test_attention_maps_per_question(torch_predictor):
    (a, b), = [torch_predictor.predict_batch([_image(4)], [QUESTIONS[:2]], output_attentions=True)[0]]
    assert a.attention.shape == (4, 4) and np.isfinite(a.attention).all()  # 32 px / 8 px patches
    assert np.allclose(a.attention.sum(), 1, atol=1e-4)  # a distribution over the image grid
    assert not np.allclose(a.attention, b.attention)  # each question looks at the image its own way


def test_bad_input_is_named(torch_predictor):
    with pytest.raises(ValueError, match="2 images but 1 question lists"):
        torch_predictor.predict_batch([_image(0), _image(1)], [QUESTIONS])
    with pytest.raises(ValueError, match="no question given for image 0"):
        torch_predictor.predict(_image(0), [])
    with pytest.raises(ValueError, match="not a non-empty string"):
        torch_predictor.predict(_image(0), ["  "])
    with pytest.raises(ValueError, match="more than|pixels"):
        torch_predictor.prepare_image(_image(0, (100, 100)), max_pixels=50 * 50)
    with pytest.raises(ValueError, match="quantize='int4'"):
        VQAPredictor.from_pretrained("unused", quantize="int4")


def test_onnx_backend_batches_like_torch(tiny_checkpoint, tmp_path, torch_predictor):
    pytest.importorskip("onnxruntime")
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    fast = VQAPredictor.from_pretrained(ckpt, backend="onnx")  # exports on first use
    assert fast.backend == "onnx"
    images, questions = [_image(5), _image(6)], [QUESTIONS, QUESTIONS[1:]]
    for got, ref in zip(fast.predict_batch(images, questions), torch_predictor.predict_batch(images, questions)):
        _same(got, ref, atol=1e-4)


def test_int8_torch_quantizes_the_linear_layers(tiny_checkpoint, torch_predictor):
    q = VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch", quantize="int8")
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in q.model.modules()}
    assert any("quantized" in k and k.endswith("Linear") for k in kinds)
    assert not any(type(m) is torch.nn.Linear for m in q.model.classifier.modules())
    image = _image(7)
    ref = torch_predictor.predict(image, QUESTIONS)
    got = q.predict(image, QUESTIONS, output_attentions=True)
    for x, y in zip(got, ref):  # random tiny weights: close, not necessarily the same ranking
        assert x.attention.shape == (4, 4)
        assert abs(dict(x.top_k).get(y.answer, x.score) - y.score) < 0.1


def test_int8_onnx_writes_quantized_parts(tiny_checkpoint, tmp_path, torch_predictor):
    pytest.importorskip("onnxruntime")
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    q = VQAPredictor.from_pretrained(ckpt, backend="onnx", quantize="int8")
    int8 = ckpt / "onnx" / "int8"
    assert {p.name for p in int8.iterdir()} == {"vision.onnx", "text.onnx", "head.onnx", "export.json"}
    assert "int8" in json.loads((int8 / "export.json").read_text())["quantization"]
    onnx = pytest.importorskip("onnx")
    for part in ("text", "head"):
        ops = {n.op_type for n in onnx.load(str(int8 / f"{part}.onnx")).graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, (part, ops)
    image = _image(8)
    ref = torch_predictor.predict(image, QUESTIONS)
    for x, y in zip(q.predict(image, QUESTIONS), ref):
        assert abs(dict(x.top_k).get(y.answer, x.score) - y.score) < 0.1


class _OtherFamilyPredictor:
    loaded = None

    @classmethod
    def from_pretrained(cls, checkpoint_dir, **kwargs):
        obj = cls()
        obj.loaded = (checkpoint_dir, kwargs)
        return obj


def test_dispatch_on_model_type(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "other-family"}))
    with pytest.raises(NotImplementedError, match="model_type='other-family'.*two_tower"):
        VQAPredictor.from_pretrained(ckpt)
    family = dataclasses.replace(registry.model_family("two_tower"), model_type="other-family",
                                 predictor=f"{__name__}:_OtherFamilyPredictor")
    monkeypatch.setitem(registry._FAMILIES, "other-family", family)
    assert predict_module.PREDICTOR_CLASSES["other-family"] == family.predictor
    got = VQAPredictor.from_pretrained(ckpt, backend="torch")
    assert type(got).__name__ == "_OtherFamilyPredictor" and got.loaded[1]["backend"] == "torch"
    with pytest.raises(FileNotFoundError, match="not a vqakit checkpoint"):
        VQAPredictor.from_pretrained(tmp_path / "nothing")
