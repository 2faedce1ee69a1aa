"""Gradient checkpointing inside the towers (``--model.gradient_checkpointing``): the layers really are
recomputed in backward, and outputs and gradients are those of the plain model (dropout included)."""

from __future__ import annotations

import pytest
import torch

from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.towers.text import load_tokenizer
from vqakit.towers.vision import build_vision_tower
from vqakit.train.config import LoraSettings
from vqakit.train.recipes import add_lora


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Forward calls of the module's first child (transformers checkpoints a layer's ``forward``, so the hooks
    of the layer itself run once; its children run again in the recomputation)."""
    module = next(module.children())
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _run(model, inputs: dict, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert b[1][name] is not None, name
        torch.testing.assert_close(a[1][name], b[1][name], msg=name)


def test_hf_towers_recompute_and_keep_outputs_and_gradients(tiny_config, tiny_batch, tiny_text_tower):
    torch.manual_seed(0)
    plain = TwoTowerForQuestionAnswering(tiny_config())
    ckpt = TwoTowerForQuestionAnswering(tiny_config(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    counts = {}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        towers = (m.backbone.text, m.backbone.vision)
        flags = [any(getattr(x, "gradient_checkpointing", False) for x in t.model.modules()) for t in towers]
        assert flags == [name == "ckpt"] * 2
        counts[name] = [_count_calls(t.layer_groups()[1]) for t in towers]  # each tower's first layer
    batch = tiny_batch(load_tokenizer(tiny_text_tower))
    _assert_same(_run(plain.train(), batch), _run(ckpt.train(), batch))  # train mode: dropout on
    assert [c[0] for c in counts["plain"]] == [1, 1]
    assert [c[0] for c in counts["ckpt"]] == [2, 2], "the tower layers were not recomputed in backward"


@pytest.mark.parametrize("multiscale", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_efficientnet_blocks_recompute_and_keep_outputs_and_gradients(multiscale, lora):
    towers = []
    for _ in range(2):
        torch.manual_seed(0)  # same random weights (and LoRA init) in both
        tower = build_vision_tower("efficientnet-lite0", image_size=32, pretrained=False, multiscale=multiscale)
        if lora:
            add_lora(tower, LoraSettings(rank=2))
        towers.append(tower)
    plain, ckpt = towers
    ckpt.gradient_checkpointing_enable()
    blocks = [t.layer_groups()[3] for t in towers]  # an MBConv block
    calls = [_count_calls(b) for b in blocks]
    x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    a, b = _run(plain.train(), x), _run(ckpt.train(), x)  # drop-connect (stochastic depth) is on in training
    _assert_same(a, b)
    if lora:
        assert all("lora_" in n for n in a[1])
    assert calls[0][0] == 1 and calls[1][0] == 2, "the blocks were not recomputed in backward"
    with torch.no_grad():  # no recomputation without gradients, and eval mode is unchanged
        torch.testing.assert_close(plain.eval()(**x), ckpt.eval()(**x))
    assert calls[1][0] == 3
