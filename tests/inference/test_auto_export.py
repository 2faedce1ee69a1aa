"""backend="auto": a checkpoint is exported to ONNX on first load (verified, tied to its weights, written
atomically under a lock) and served by ONNX Runtime; anything that stops that falls back to PyTorch with one warning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqakit.inference import export as export_module
from vqakit.inference.export import ensure_onnx, export_is_current, weights_digest
from vqakit.inference.predict import VQAPredictor

pytest.importorskip("onnxruntime")

QUESTIONS = ["what is the color of the shape?", "is there a red circle?"]


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    # without onnx/: earlier tests' default (auto) loads of the shared checkpoint may have exported it already
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt", ignore=shutil.ignore_patterns("onnx", ".onnx*"))


@pytest.fixture
def exports(monkeypatch):
    """Counts the exports actually run (verified graph writes)."""
    calls = []
    real = export_module._export_verified

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "_export_verified", counted)
    return calls


def _image():
    import numpy as np

    return np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)


def _leftovers(ckpt) -> list[str]:
    """Temporary export directories left in the checkpoint (there must be none)."""
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("."))


def test_auto_exports_on_first_load_then_reuses(ckpt, exports):
    fast = VQAPredictor.from_pretrained(ckpt)  # no `vqakit export` before
    assert fast.backend == "onnx" and len(exports) == 1
    info = json.loads((ckpt / "onnx" / "export.json").read_text())
    assert info["weights_sha256"] == weights_digest(ckpt) and all(d <= 1e-4 for d in info["max_abs_diff"].values())
    again = VQAPredictor.from_pretrained(ckpt)
    assert again.backend == "onnx" and len(exports) == 1  # the current export is reused
    slow = VQAPredictor.from_pretrained(ckpt, backend="torch")  # backend= still forces one
    assert slow.backend == "torch"
    for a, b in zip(again.predict(_image(), QUESTIONS), slow.predict(_image(), QUESTIONS)):
        assert a.answer == b.answer and abs(a.score - b.score) < 1e-4
    assert _leftovers(ckpt) == []


def test_torch_backend_writes_nothing(ckpt):
    VQAPredictor.from_pretrained(ckpt, backend="torch")
    assert not (ckpt / "onnx").exists()


def test_retrained_weights_are_exported_again(ckpt, exports):
    VQAPredictor.from_pretrained(ckpt)
    old = json.loads((ckpt / "onnx" / "export.json").read_text())["weights_sha256"]
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in weights if k.startswith("classifier") or "head" in k)
    weights[name] = weights[name] + 1.0  # "retrained": other weights under the same file name
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    assert not export_is_current(ckpt)
    fresh = VQAPredictor.from_pretrained(ckpt)
    assert fresh.backend == "onnx" and len(exports) == 2
    new = json.loads((ckpt / "onnx" / "export.json").read_text())["weights_sha256"]
    assert new != old and new == weights_digest(ckpt)
    slow = VQAPredictor.from_pretrained(ckpt, backend="torch")
    for a, b in zip(fresh.predict(_image(), QUESTIONS), slow.predict(_image(), QUESTIONS)):
        assert abs(a.score - b.score) < 1e-4  # the new weights' graph, not the stale one


def test_copied_checkpoint_reuses_its_export(ckpt, tmp_path, exports):
    ensure_onnx(ckpt)
    copy = shutil.copytree(ckpt, tmp_path / "copy")  # new mtimes: the digest is recomputed, and matches
    assert export_is_current(copy)
    assert VQAPredictor.from_pretrained(copy).backend == "onnx" and len(exports) == 1


def test_export_without_digest_is_replaced(ckpt, exports):
    out = ensure_onnx(ckpt)
    info = json.loads((out / "export.json").read_text())
    del info["weights_sha256"]  # as written by an older vqakit
    (out / "export.json").write_text(json.dumps(info))
    assert not export_is_current(ckpt)
    assert VQAPredictor.from_pretrained(ckpt).backend == "onnx" and len(exports) == 2


def test_failed_verification_falls_back_with_one_warning(ckpt, monkeypatch, caplog):
    def bad(*args, **kwargs):
        raise RuntimeError("ONNX export of the head differs from PyTorch by 3.00e-02 (> 0.0001)")

    monkeypatch.setattr(export_module, "_export_verified", bad)
    with caplog.at_level(logging.INFO, logger="vqakit"):
        predictor = VQAPredictor.from_pretrained(ckpt)
    assert predictor.backend == "torch"
    records = [r for r in caplog.records if r.name == "vqakit"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "PyTorch" in records[0].getMessage() and "differs from PyTorch" in records[0].getMessage()
    assert not (ckpt / "onnx").exists() and _leftovers(ckpt) == []  # nothing half-written is left
    with pytest.raises(RuntimeError, match="differs"):  # a forced backend shows the error instead
        VQAPredictor.from_pretrained(ckpt, backend="onnx")


def test_unwritable_dir_falls_back_with_one_warning(ckpt, monkeypatch, caplog):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(ckpt))

    monkeypatch.setattr(export_module, "_export_lock", denied)  # root can write anywhere: simulate the denial
    with caplog.at_level(logging.INFO, logger="vqakit"):
        predictor = VQAPredictor.from_pretrained(ckpt)
    records = [r for r in caplog.records if r.name == "vqakit"]
    assert predictor.backend == "torch" and len(records) == 1 and "Permission denied" in records[0].getMessage()


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_read_only_dir_falls_back_but_uses_an_existing_export(ckpt, caplog):
    os.chmod(ckpt, 0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="vqakit"):
            assert VQAPredictor.from_pretrained(ckpt).backend == "torch"
        assert len([r for r in caplog.records if r.name == "vqakit"]) == 1
    finally:
        os.chmod(ckpt, 0o755)
    ensure_onnx(ckpt)
    os.chmod(ckpt, 0o555)
    try:  # a current export needs no write: read-only checkpoints exported before serve fast
        assert VQAPredictor.from_pretrained(ckpt).backend == "onnx"
    finally:
        os.chmod(ckpt, 0o755)


def test_concurrent_first_loads_export_once(ckpt, exports):
    results, errors = [], []

    def load():
        try:
            results.append(ensure_onnx(ckpt))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3 and len(exports) == 1
    assert export_is_current(ckpt) and _leftovers(ckpt) == []
    assert {p.name for p in (ckpt / "onnx").iterdir()} == {"vision.onnx", "text.onnx", "head.onnx", "export.json"}


def test_int8_export_is_tied_to_the_same_weights(ckpt):
    q = VQAPredictor.from_pretrained(ckpt, quantize="int8")
    assert q.backend == "onnx" and q.quantize == "int8"
    assert export_is_current(ckpt, ckpt / "onnx" / "int8")
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v + 0.0 * torch.ones_like(v) for k, v in weights.items()}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt", "retrained": "yes"})  # same tensors, other bytes: another file
    assert not export_is_current(ckpt, ckpt / "onnx" / "int8")


def test_parallel_towers_answer_like_sequential(ckpt):
    from vqakit.inference.onnx_runtime import OnnxParts

    predictor = VQAPredictor.from_pretrained(ckpt)
    images = [predictor.prepare_image(_image()), predictor.prepare_image(_image()[::-1].copy())]
    questions = [QUESTIONS, [QUESTIONS[1] + " #7"]]
    sequential = predictor.predict_prepared(images, questions)
    predictor.onnx = OnnxParts(ensure_onnx(ckpt), parallel_towers=True)
    parallel = predictor.predict_prepared(images, questions)
    for a, b in zip(sum(sequential, []), sum(parallel, [])):
        assert a.question == b.question and a.answer == b.answer and a.score == pytest.approx(b.score, abs=1e-6)
