"""Resumable training: atomic checkpoint writes, RNG state, time to train across restarts.

Lightning saves model, optimizer, scheduler and loop progress, and (since 2.3) the state of a stateful
train dataloader; this module adds what it leaves out:
- ``AtomicCheckpointIO``: write to a temporary file in the same folder, fsync, then ``os.replace``, so a
  run killed while saving leaves the previous checkpoint intact and never a half-written one. A write that
  fails (ENOSPC: a full disk) removes the temporary file and stops the run with ``CheckpointWriteError``;
  the previous checkpoint is untouched. The ``last.ckpt`` it replaces is kept as ``last.prev.ckpt``.
- ``resume_checkpoint``: the newest readable of ``last.ckpt`` / ``last.prev.ckpt`` (a damaged one is named
  and skipped), for ``--train.resume``.
- ``ResumeState``: Python / NumPy / torch RNG states (dropout masks after a resume match an uninterrupted
  run) and the time to train accumulated over every attempt.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

logger = logging.getLogger("vqakit")

LAST, PREVIOUS = "last.ckpt", "last.prev.ckpt"


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed part way (a full disk, an I/O error); the previous one is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            tmp.unlink(missing_ok=True)
            previous = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
            raise CheckpointWriteError(f"writing the checkpoint {path} failed ({err}); {previous}. Free disk "
                                       f"space in {path.parent} (or set --train.out_dir elsewhere) and rerun "
                                       f"with --train.resume true") from err
        if path.name == LAST and path.is_file():  # keep the one it replaces: a fallback if the new one is damaged
            link = path.with_name(f".{PREVIOUS}.tmp")
            link.unlink(missing_ok=True)
            os.link(path, link)  # a hard link: no copy, and there is a last.ckpt at every moment
            os.replace(link, path.with_name(PREVIOUS))
        os.replace(tmp, path)


def resume_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint ``--train.resume`` continues from: ``last.ckpt`` if it loads, else ``last.prev.ckpt``
    (logged, with why ``last.ckpt`` was refused); ``None`` when there is none; ``RuntimeError`` naming each
    file when none loads. Loading is the check (``torch.load`` memory-mapped: it reads the archive's index,
    and fails on a truncated or overwritten file)."""
    problems = []
    for name in (LAST, PREVIOUS):
        path = checkpoints / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if "state_dict" not in state or "global_step" not in state:
                raise ValueError("not a Lightning checkpoint (no state_dict / global_step)")
        except Exception as err:
            problems.append(f"{path} cannot be loaded ({type(err).__name__}: {err})")
            logger.warning("%s", problems[-1])
            continue
        if problems:
            logger.warning("resuming from the previous checkpoint %s (step %d) instead", path, state["global_step"])
        return path
    if problems:
        raise RuntimeError("--train.resume: no checkpoint can be loaded: " + "; ".join(problems)
                           + f". Delete {checkpoints} to start the run again")
    return None


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
