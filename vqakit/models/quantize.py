"""Dynamic INT8 of a model's Linear layers in PyTorch (``torch.ao.quantization.quantize_dynamic``), for CPU serving.

>>> import torch
>>> type(quantize_dynamic_int8(torch.nn.Sequential(torch.nn.Linear(4, 2)), {torch.nn.Linear})[0]).__module__
'torch.ao.nn.quantized.dynamic.modules.linear'
"""

from __future__ import annotations

import warnings

import torch


def quantize_dynamic_int8(module: torch.nn.Module, spec) -> torch.nn.Module:
    """``module`` in eval mode with the layers ``spec`` names (a set of module types, or names -> qconfig) given
    int8 weights and activations quantized per batch. torch's announcement of the quantized tensor types' future
    removal, which it makes per layer, is kept out of the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module.eval(), spec, dtype=torch.qint8)
