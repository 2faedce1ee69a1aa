"""The training plan: how much training a run gives, decided before it starts, printed and recorded.

A preset states its length one of two ways, and the rule for data of another size follows from it:

- ``train.max_steps: N`` (> 0): **N optimizer steps whatever the data size**; the number of passes follows
  (``epochs = ceil(N / steps_per_epoch)``, the last one partial) and ``train.epochs`` is not a cap. A preset sized
  for 200k questions pointed at 40k runs the same number of steps, about 5x more passes.
- ``train.max_steps: -1``: ``train.epochs`` passes over the training questions; the steps follow the data size.

Either way the learning-rate schedule (warm-up + cosine) spans exactly the planned steps, so a run never stops
with its learning rate still high. The plan is printed before training starts and, once the first steps are
timed, with an estimate of the time to train; both are written to ``training_metadata.json`` (``plan``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import lightning as L

logger = logging.getLogger("vqakit")


@dataclass
class TrainingPlan:
    """What a run will do. ``epochs`` may be fractional in the description but Lightning gets whole passes."""

    steps: int
    steps_per_epoch: int
    epochs: float
    questions: int
    batch_size: int
    world_size: int
    rule: str  # "max_steps" or "epochs"
    seconds_per_step: float | None = None
    estimated_minutes: float | None = None

    @property
    def max_epochs(self) -> int:
        return max(1, math.ceil(self.epochs - 1e-9))

    def describe(self) -> str:
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        text = (f"training plan: {self.steps:,} steps = {self.epochs:.2f} epochs of {self.questions:,} questions, "
                f"batch {self.batch_size}{ranks} ({'fixed steps: --train.max_steps' if self.rule == 'max_steps' else 'fixed passes: --train.epochs'})")
        if self.estimated_minutes is not None:
            text += f", ~{self.estimated_minutes:.1f} min on this machine ({self.seconds_per_step:.3f} s/step)"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(num_questions: int, batch_size: int, epochs: int, max_steps: int, world_size: int = 1) -> TrainingPlan:
    """The plan for ``num_questions`` training questions (see the module docstring for the rule).

    >>> make_plan(40_000, 160, epochs=4, max_steps=3700).epochs  # a 200k-question preset on 40k: all 3,700 steps
    14.8
    >>> make_plan(1_000, 100, epochs=3, max_steps=-1).steps
    30
    """
    if num_questions < 1:
        raise ValueError("the training split is empty: nothing to plan")
    per_rank = -(-num_questions // world_size)  # DistributedSampler pads every rank to the same count
    steps_per_epoch = -(-per_rank // batch_size)
    if max_steps > 0:
        return TrainingPlan(max_steps, steps_per_epoch, round(max_steps / steps_per_epoch, 2), num_questions,
                            batch_size, world_size, "max_steps")
    return TrainingPlan(epochs * steps_per_epoch, steps_per_epoch, float(epochs), num_questions, batch_size,
                        world_size, "epochs")


class PlanTimer(L.Callback):
    """Times steps ``skip``..``skip + measure`` (after warm-up of caches and allocators) and logs the plan again
    with the estimated time to train."""

    def __init__(self, plan: TrainingPlan, skip: int = 5, measure: int = 20):
        self.plan, self.skip, self.measure = plan, skip, measure
        self._start: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.skip:
            self._start = time.perf_counter()
        elif self._start is not None and step == self.skip + self.measure:
            per_step = (time.perf_counter() - self._start) / self.measure
            self.plan.seconds_per_step = round(per_step, 4)
            self.plan.estimated_minutes = round(per_step * self.plan.steps / 60, 1)
            self._start = None
            if trainer.is_global_zero:
                logger.info("%s", self.plan.describe())
