"""The warm-up + cosine LR schedule shared by the classifier and generative systems."""

from __future__ import annotations

import math

import pytest
import torch

from vqakit.train.schedule import warmup_cosine, warmup_cosine_schedule


def _reference(step: int, total: int, ratio: float) -> float:
    """The formula as first written in both systems' ``configure_optimizers``."""
    warmup = int(ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("total, ratio", [(1, 0.0), (1, 0.5), (10, 0.0), (10, 0.2), (37, 0.1), (1000, 0.06)])
def test_same_values_as_the_reference_formula(total, ratio):
    f = warmup_cosine(total, ratio)
    assert [f(s) for s in range(total + 3)] == [_reference(s, total, ratio) for s in range(total + 3)]


def test_warm_up_starts_low_and_reaches_the_peak():
    f = warmup_cosine(total_steps=100, warmup_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert [f(s) for s in range(11)] == sorted(f(s) for s in range(11))  # rising
    assert f(9) == pytest.approx(10 / 11) and f(10) == 1.0  # the peak right after the warm-up


def test_cosine_decays_monotonically_to_zero():
    total = 100
    f = warmup_cosine(total_steps=total, warmup_ratio=0.1)
    decay = [f(s) for s in range(10, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(total) == 0.0 and f(total + 5) == 0.0
    assert warmup_cosine(total_steps=total, warmup_ratio=0.0)(0) == 1.0  # no warm-up: the peak first


def test_lambda_lr_scales_every_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 1e-4}])
    sched = warmup_cosine_schedule(opt, total_steps=10, warmup_ratio=0.2)
    f = warmup_cosine(10, 0.2)
    for step in range(12):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * f(step), 1e-4 * f(step)])
        opt.step()
        sched.step()


def test_focal_exponent_waits_for_focal_from_then_rises_over_a_tenth_of_the_steps(tiny_config):
    """--train.focal_from: the plain loss first, then the focal exponent rises linearly to --model.focal_gamma;
    0 applies it from the first step, and without a focal exponent nothing changes."""
    from vqakit.models.two_tower import TwoTowerForQuestionAnswering
    from vqakit.train.config import TrainConfig
    from vqakit.train.system import VQASystem

    class AtStep(VQASystem):
        step = 0

        @property
        def global_step(self):
            return self.step

    model = TwoTowerForQuestionAnswering(tiny_config(focal_gamma=2.0))
    system = AtStep(model, TrainConfig(focal_from=0.5), total_steps=100)
    gammas = {}
    for system.step in (0, 49, 50, 55, 60, 99):
        gammas[system.step] = system.focal_gamma()
    assert gammas == pytest.approx({0: 0.0, 49: 0.0, 50: 0.0, 55: 1.0, 60: 2.0, 99: 2.0})
    assert AtStep(model, TrainConfig(), total_steps=100).focal_gamma() == 2.0
    plain = TwoTowerForQuestionAnswering(tiny_config())
    assert AtStep(plain, TrainConfig(focal_from=0.5), total_steps=100).focal_gamma() == 0.0
    with pytest.raises(ValueError, match="focal_from"):
        TrainConfig(focal_from=1.0)
