"""The INT8 accuracy check and what ``quantize="auto"`` (the serving default) makes of it: INT8 only where the check
of these very weights found it keeps accuracy, float32 otherwise."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from safetensors.torch import load_file, save_file

from vqakit.cli import main
from vqakit.data.config import DataConfig, load_split
from vqakit.eval.int8 import verify_int8
from vqakit.inference.export import INT8_ACCURACY, int8_verdict
from vqakit.inference.predict import VQAPredictor

pytest.importorskip("onnxruntime")


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt", ignore=shutil.ignore_patterns("onnx", ".onnx*"))


@pytest.fixture(scope="module")
def examples():
    return load_split(DataConfig(dataset="easy-vqa", limit=24), "test")


def test_a_passed_check_serves_int8_and_a_failed_one_float32(ckpt, examples, caplog):
    assert int8_verdict(ckpt) is None
    with caplog.at_level(logging.DEBUG, logger="vqakit"):
        assert VQAPredictor.from_pretrained(ckpt).quantize is None  # no check yet: float32
    assert "no INT8 accuracy check" in caplog.text

    record = verify_int8(ckpt, examples, max_drop=100.0, limit=10)
    assert record["questions"] == 10 and record["keeps_accuracy"]
    assert 0 <= record["int8_accuracy"] <= 100 and 0 <= record["float32_accuracy"] <= 100
    assert record["drop"] == round(record["float32_accuracy"] - record["int8_accuracy"], 2)
    assert int8_verdict(ckpt)["int8_accuracy"] == record["int8_accuracy"]
    fast = VQAPredictor.from_pretrained(ckpt)
    assert fast.quantize == "int8" and fast.backend == "onnx"
    assert VQAPredictor.from_pretrained(ckpt, backend="torch").quantize is None  # the check was of the ONNX path
    assert VQAPredictor.from_pretrained(ckpt, quantize=None).quantize is None  # float32 when asked

    caplog.clear()
    record = verify_int8(ckpt, examples, max_drop=-1.0, limit=10)  # a check INT8 cannot pass
    assert not record["keeps_accuracy"]
    with caplog.at_level(logging.INFO, logger="vqakit"):
        assert VQAPredictor.from_pretrained(ckpt).quantize is None
    assert "serving" in caplog.text and "in float32: INT8 scored" in caplog.text
    assert VQAPredictor.from_pretrained(ckpt, quantize="int8").quantize == "int8"  # still there when asked


def test_a_check_of_other_weights_does_not_count(ckpt, examples):
    verify_int8(ckpt, examples, max_drop=100.0, limit=6)
    assert VQAPredictor.from_pretrained(ckpt).quantize == "int8"
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, ckpt / "model.safetensors")
    assert int8_verdict(ckpt) is None  # retrained: the record was of the old weights
    assert VQAPredictor.from_pretrained(ckpt).quantize is None


def test_a_corrupt_record_is_no_check(ckpt, examples):
    verify_int8(ckpt, examples, max_drop=100.0, limit=6)
    (ckpt / "onnx" / "int8" / INT8_ACCURACY).write_text("{not json")
    assert int8_verdict(ckpt) is None and VQAPredictor.from_pretrained(ckpt).quantize is None


def test_no_answered_questions_is_a_clear_error(ckpt, examples):
    import dataclasses

    blind = [dataclasses.replace(e, answers=[]) for e in examples]
    with pytest.raises(ValueError, match="no question with human answers"):
        verify_int8(ckpt, blind)


def test_export_verify_int8_command(ckpt):
    main(["export", "--checkpoint", str(ckpt), "--verify_int8", "true", "--data.dataset", "easy-vqa",
          "--data.limit", "12", "--split", "test", "--max_drop", "100"])
    record = json.loads((ckpt / "onnx" / "int8" / INT8_ACCURACY).read_text())
    assert record["keeps_accuracy"] and record["questions"] >= 1
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--verify_int8", "true", "--out_dir", str(ckpt / "elsewhere")])
