"""Resumable training: a run killed with SIGKILL mid-epoch resumes from its last checkpoint and ends
exactly where an uninterrupted run ends (same weights), having lost at most one checkpoint interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from vqakit.cli import main


def _args(model_args, run_dir, cache):
    return [
        "train", *model_args, "--data.limit", "64", "--data.cache_dir", str(cache), "--train.out_dir", str(run_dir),
        "--train.epochs", "3", "--train.batch_size", "4", "--train.checkpoint_every_n_examples", "8",
        "--train.progress", "false", "--evaluate", "false", "--train.logger", "none",
    ]  # fmt: skip


def test_checkpoint_files(tiny_model_args, tmp_path):
    main(_args(tiny_model_args, tmp_path / "run", tmp_path / "cache"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {"last.ckpt", "last.prev.ckpt", "best.ckpt"}
    state = torch.load(ckpts / "last.ckpt", weights_only=False)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "training_metadata.json").read_text())
    assert state["global_step"] == meta["steps"] > 3 and "vqakit" in state
    assert state["vqakit"]["time_to_train_s"] > 0 and meta["resumed_from_step"] is None
    # frozen towers (the default) are left out, and named; the fusion layers and head are in
    omitted = state["vqakit_frozen_tower_keys"]
    assert omitted and all(k.startswith(("model.backbone.vision.", "model.backbone.text.")) for k in omitted)
    assert not set(omitted) & set(state["state_dict"])
    assert any(k.startswith("model.backbone.fusion.") for k in state["state_dict"])


def test_frozen_tower_weights_are_left_out_and_restored(tiny_config):
    """LoRA text tower (frozen base) + partial vision tower: only what trains is saved; loading refills
    the rest from the rebuilt model and checks that the same weights are frozen."""
    import pytest

    from vqakit.models.two_tower import TwoTowerForQuestionAnswering
    from vqakit.train.config import TrainConfig
    from vqakit.train.recipes import apply_strategies
    from vqakit.train.system import VQASystem

    def build(**strategies):
        torch.manual_seed(0)
        net = TwoTowerForQuestionAnswering(tiny_config())
        cfg = TrainConfig(**{"vision": "partial", "text": "lora", "unfreeze_last_n": 1, **strategies})
        apply_strategies(net, cfg)
        return VQASystem(net, cfg, total_steps=1)

    system = build()
    trained = {n for n, p in system.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in system.named_parameters():
            if p.requires_grad:
                p.add_(1.0)  # as after training
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)
    saved = set(checkpoint["state_dict"])
    assert trained <= saved and not set(checkpoint["vqakit_frozen_tower_keys"]) & saved
    assert any("base_layer" in k for k in checkpoint["vqakit_frozen_tower_keys"])  # LoRA's frozen base weights
    assert any(".embeddings." in k and "vision" in k for k in checkpoint["vqakit_frozen_tower_keys"])  # partial

    resumed = build()
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=True)
    want, got = system.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    other = build(vision="full")
    with pytest.raises(ValueError, match="other strategies"):
        other.on_load_checkpoint({"state_dict": {}, "vqakit_frozen_tower_keys": checkpoint["vqakit_frozen_tower_keys"]})


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_model_args, tmp_path):
    cache = tmp_path / "cache"
    main(_args(tiny_model_args, tmp_path / "reference", cache))  # also warms the cache
    total = json.loads((tmp_path / "reference" / "checkpoint" / "training_metadata.json").read_text())["steps"]

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vqakit.cli", *_args(tiny_model_args, run, cache)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "checkpoint" / "model.safetensors").exists()
    assert not list((run / "checkpoints").glob(".*tmp")) or last.exists()  # never a half-written last.ckpt
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < killed_at < total

    main([*_args(tiny_model_args, run, cache), "--train.resume", "true"])
    meta = json.loads((run / "checkpoint" / "training_metadata.json").read_text())
    assert meta["resumed_from_step"] == killed_at and meta["steps"] == total
    a = load_file(str(tmp_path / "reference" / "checkpoint" / "model.safetensors"))
    b = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged from the uninterrupted one"
