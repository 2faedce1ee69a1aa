"""Training flushes CPU denormals to zero (``--train.flush_denormal``): on while a run trains, off again after."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from vqakit.data.config import DataConfig
from vqakit.train.config import TrainConfig
from vqakit.train.run import fit, flush_denormal

DENORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38


def _flushes() -> bool:
    """Whether float32 arithmetic on this thread treats a denormal as zero right now."""
    return (torch.tensor([DENORMAL]) * 1.0).item() == 0.0


def _can_flush() -> bool:
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    return supported


pytestmark = pytest.mark.skipif(not _can_flush(), reason="this CPU cannot flush denormals to zero")


def test_the_block_flushes_denormals_and_restores_the_default():
    assert not _flushes()
    with flush_denormal(True) as enabled:
        assert enabled and _flushes()
    assert not _flushes()
    with flush_denormal(False) as enabled:
        assert not enabled and not _flushes()
    with pytest.raises(RuntimeError), flush_denormal(True):  # restored on an error too
        raise RuntimeError("boom")
    assert not _flushes()


class _Probe(L.Callback):
    def __init__(self):
        self.seen: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(_flushes())


@pytest.mark.parametrize("on", [True, False])
def test_a_run_trains_with_denormals_flushed_unless_told_not_to(tiny_config, tmp_path, on):
    probe = _Probe()
    data = DataConfig(dataset="easy-vqa", limit=24, cache_dir=str(tmp_path / "cache"))
    train = TrainConfig(out_dir=str(tmp_path / "run"), epochs=1, batch_size=8, progress=False, logger="none",
                        export_onnx=False, flush_denormal=on)
    fit(tiny_config(), data, train, evaluate=False, callbacks=[probe])
    assert probe.seen and all(seen == on for seen in probe.seen)
    assert not _flushes()  # the process is left as it was
    meta = json.loads((tmp_path / "run" / "checkpoint" / "training_metadata.json").read_text())
    assert meta["flush_denormal"] is on


def test_the_threads_of_a_parallel_op_flush_too():
    """A parallel elementwise op splits its tensor among the intra-op threads: every chunk must flush, also with
    another OpenMP runtime loaded in the process (scikit-learn's own libgomp)."""
    pytest.importorskip("sklearn.linear_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((1 << 20,), DENORMAL)
        assert ((x * 1.0) != 0).all()
        with flush_denormal(True):
            assert ((x * 1.0) == 0).all()
        assert ((x * 1.0) != 0).all()
    finally:
        torch.set_num_threads(threads)
