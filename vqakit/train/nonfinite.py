"""What a NaN / inf training loss does (``--train.on_nonfinite_loss``): stop at once, or skip the batch.

One non-finite loss back-propagates NaN into every weight, after which every later step and checkpoint is
garbage while the run looks alive. ``stop`` raises before the optimizer step, naming the step, the batch's
question ids (to look at their images and answers) and the last checkpoint saved before it, which
``--train.resume true`` continues from. ``skip`` returns ``None`` from ``training_step``, which makes
Lightning skip backward and the optimizer step for that batch (automatic optimization; not under DDP,
where the other ranks would wait for its gradients), and counts it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger("vqakit")


class NonFiniteLossError(RuntimeError):
    """A NaN or inf training loss with ``--train.on_nonfinite_loss stop``."""


def checked_loss(module, loss: torch.Tensor, batch: dict) -> torch.Tensor | None:
    """``loss`` if it is finite; else raise ``NonFiniteLossError`` (``stop``) or count it and return ``None``
    (``skip``). ``module`` is the LightningModule (``cfg.on_nonfinite_loss``, ``skipped_nonfinite``)."""
    if bool(torch.isfinite(loss).all()):
        return loss
    trainer = module.trainer
    ids = batch.get("question_id", batch.get("index"))
    ids = ids.tolist() if ids is not None else []
    kind = "question ids" if "question_id" in batch else "dataset rows"
    where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
    if module.cfg.on_nonfinite_loss == "skip":
        module.skipped_nonfinite += 1
        logger.warning("training loss is %s at %s: batch skipped (%d so far); %s %s", loss.item(), where,
                       module.skipped_nonfinite, kind, ids)
        return None
    last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    good = (f"the last good checkpoint is {last}; --train.resume true continues from it" if last.is_file()
            else "no checkpoint was saved before it")
    raise NonFiniteLossError(
        f"training loss is {loss.item()} at {where}, batch {kind} {ids}; {good}. Lower --train.lr or "
        f"--train.grad_clip, check those questions' images, or pass --train.on_nonfinite_loss skip to drop such "
        f"batches and count them")
