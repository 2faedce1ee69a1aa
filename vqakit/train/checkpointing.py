"""Resumable training: atomic checkpoint writes, RNG state, time to train across restarts.

Lightning saves model, optimizer, scheduler and loop progress, and (since 2.3) the state of a stateful
train dataloader; this module adds what it leaves out:
- ``AtomicCheckpointIO``: write to a temporary file in the same folder, fsync, then ``os.replace``, so a
  run killed while saving leaves the previous checkpoint intact and never a half-written one.
- ``ResumeState``: Python / NumPy / torch RNG states (dropout masks after a resume match an uninterrupted
  run) and the time to train accumulated over every attempt.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class ResumeState(L.Callback):
    """Saves RNG states and the elapsed training time into every checkpoint; restores them on resume."""

    def __init__(self):
        self.previous_seconds = 0.0
        self.start = None
        self.resumed_from_step: int | None = None
        self.epoch_seconds: list[float] = []
        self._epoch_start = None

    @property
    def seconds(self) -> float:
        return self.previous_seconds + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        self._epoch_start = self.start  # a resumed run enters mid-epoch without on_train_epoch_start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_seconds.append(round(time.perf_counter() - self._epoch_start, 2))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # plain tensors and numbers only: Lightning loads checkpoints with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["vqakit"] = {
            "time_to_train_s": self.seconds,
            "epoch_seconds": list(self.epoch_seconds),
            "rng": {
                "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
                "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
                "numpy_gauss": (int(has_gauss), float(cached)), "torch": torch.get_rng_state(),
            },
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        state = checkpoint.get("vqakit")
        self.resumed_from_step = checkpoint.get("global_step")
        if state is None:
            return
        self.previous_seconds = state["time_to_train_s"]
        self.epoch_seconds = list(state.get("epoch_seconds", []))
        rng = state["rng"]
        random.setstate((3, tuple(rng["python"]), rng["python_gauss"]))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], *rng["numpy_gauss"]))
        torch.set_rng_state(rng["torch"])
