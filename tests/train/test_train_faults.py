"""Training under faults made for real: a truncated ``last.ckpt`` (resume falls back to ``last.prev.ckpt``), a
checkpoint write onto a full device (``/dev/full``, and a full tmpfs where mounting is allowed), a NaN loss."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess

import pytest
import torch

from vqakit.cli import main
from vqakit.train.checkpointing import AtomicCheckpointIO, CheckpointWriteError, resume_checkpoint
from vqakit.train.nonfinite import NonFiniteLossError


def _args(model_args, run_dir, cache, *extra):
    return [
        "train", *model_args, "--data.limit", "32", "--data.cache_dir", str(cache), "--train.out_dir", str(run_dir),
        "--train.epochs", "2", "--train.batch_size", "4", "--train.checkpoint_every_n_examples", "8",
        "--train.progress", "false", "--evaluate", "false", "--train.logger", "none", *extra,
    ]  # fmt: skip


def test_a_truncated_last_ckpt_resumes_from_the_previous_one(tiny_model_args, tmp_path, caplog):
    run, cache = tmp_path / "run", tmp_path / "cache"
    main(_args(tiny_model_args, run, cache))
    ckpts = run / "checkpoints"
    prev_step = torch.load(ckpts / "last.prev.ckpt", weights_only=False)["global_step"]
    assert 0 < prev_step < torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    os.truncate(ckpts / "last.ckpt", (ckpts / "last.ckpt").stat().st_size // 2)

    with caplog.at_level(logging.WARNING, logger="vqakit"):
        assert resume_checkpoint(ckpts) == ckpts / "last.prev.ckpt"
    assert f"{ckpts / 'last.ckpt'} cannot be loaded" in caplog.text
    assert f"resuming from the previous checkpoint {ckpts / 'last.prev.ckpt'} (step {prev_step})" in caplog.text

    main([*_args(tiny_model_args, run, cache), "--train.resume", "true"])
    meta = json.loads((run / "checkpoint" / "training_metadata.json").read_text())
    assert meta["resumed_from_step"] == prev_step and meta["steps"] == 16

    for name in ("last.ckpt", "last.prev.ckpt"):  # both damaged: one error naming both
        (ckpts / name).write_bytes(b"\0" * 100)
    with pytest.raises(RuntimeError, match="no checkpoint can be loaded.*last.ckpt.*last.prev.ckpt"):
        resume_checkpoint(ckpts)


def _full_device_write(tmp_path, redirect):
    """Save a good last.ckpt, then save again with the write going to a full device; the first must survive."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    redirect(path)
    big = {"state_dict": {"w": torch.zeros(4 << 20)}, "global_step": 2}  # 16 MB: larger than any write buffer
    with pytest.raises(CheckpointWriteError, match=f"writing the checkpoint {path} failed.*previous last.ckpt is intact"):
        io.save_checkpoint(big, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert not (path.parent / ".last.ckpt.tmp").exists()


def test_a_checkpoint_write_onto_dev_full_leaves_the_previous_one(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    _full_device_write(tmp_path, lambda path: (path.parent / ".last.ckpt.tmp").symlink_to("/dev/full"))


def test_a_checkpoint_write_onto_a_full_filesystem_leaves_the_previous_one(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        _full_device_write(mnt, lambda path: None)  # 2 MB holds the first checkpoint, not the second
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_nan_loss_stops_at_once_or_is_skipped(tiny_model_args, tmp_path, capsys):
    args = _args(tiny_model_args, tmp_path / "run", tmp_path / "cache", "--train.lr", "1e30",
                 "--train.warmup_ratio", "0", "--train.grad_clip", "0")  # weights overflow after a step or two
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert isinstance(stop.value.__cause__, NonFiniteLossError)
    assert re.search(r"vqakit: error: training loss is nan at step \d+ \(epoch 0\), batch question ids "
                     r"\[\d+, \d+, \d+, \d+\]; (the last good checkpoint is .*last.ckpt|no checkpoint was saved)",
                     capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint").exists()

    main([*args, "--train.on_nonfinite_loss", "skip", "--train.out_dir", str(tmp_path / "skip")])
    meta = json.loads((tmp_path / "skip" / "checkpoint" / "training_metadata.json").read_text())
    assert 0 < meta["skipped_nonfinite_batches"] <= meta["steps"] + meta["skipped_nonfinite_batches"]
