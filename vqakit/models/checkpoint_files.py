"""Reading a checkpoint directory's ``config.json`` and ``model.safetensors`` with errors that name the file.

A weights file cut short (a full disk, a killed copy) or a config overwritten with other bytes must give one
clear error naming the file and what to do, not safetensors' ``incomplete metadata`` or a JSON traceback.
Every model family loads its files through these two functions.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_config_json(path: str | Path) -> dict:
    """The JSON object in a checkpoint's ``config.json``; ``ValueError`` naming the file if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a vqakit checkpoint directory")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the checkpoint's config is damaged; copy the "
                         f"checkpoint directory again or re-save it from the run's checkpoints/last.ckpt") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: the config is damaged")
    return config


def load_weights(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a ``model.safetensors``; ``ValueError`` naming the file if it is truncated or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the checkpoint has a config but no weights)")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError) as err:
        size = path.stat().st_size
        raise ValueError(f"{path} cannot be read ({err}; {size:,} bytes): the weights file is truncated or "
                         f"damaged; copy the checkpoint directory again, or re-save it from the run's "
                         f"checkpoints/last.ckpt") from None
