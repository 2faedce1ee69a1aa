"""Training strategies, one explicit knob per tower: ``frozen``, ``lora`` (PEFT), ``full`` or ``partial``.

Fusion layers and the head always train. ``frozen`` towers do not run during training at all: their
outputs come from the feature cache. ``lora`` wraps the tower's network in a PEFT model
(``get_peft_model``), so only the low-rank updates train; at save time the adapter is written in
PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) and then merged, so the
checkpoint's ``model.safetensors`` serves at full speed with no PEFT dependency. ``partial`` trains
only the tower's last ``unfreeze_last_n`` layer groups (stage 2 of two-stage training, as in seed 003's
"unfreeze the last N layers").
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vqakit.train.config import LoraSettings, TrainConfig

# Attention query/value projections as each family names them (Hu et al. adapt W_q and W_v), and the
# 1x1 convs of every EfficientNet MBConv block. The first pair found in a tower is its default.
DEFAULT_LORA_TARGETS = (
    ["query", "value"],  # BERT, RoBERTa, DeBERTa; ViT in transformers < 5
    ["q_proj", "v_proj"],  # ViT/DeiT in transformers >= 5, CLIP-style encoders
    ["q_lin", "v_lin"],  # DistilBERT
    ["_expand_conv", "_project_conv"],  # EfficientNet(-Lite)
)


def default_lora_targets(tower: nn.Module) -> list[str]:
    names = {n.split(".")[-1] for n, _ in tower.named_modules()}
    for pair in DEFAULT_LORA_TARGETS:
        if set(pair) <= names:
            return pair
    raise ValueError(f"no default LoRA targets for {type(tower).__name__}; set target_modules "
                     f"(--train.lora_vision.target_modules / --train.lora_text.target_modules)")


def towers(model) -> dict[str, nn.Module]:
    return {"vision": model.backbone.vision, "text": model.backbone.text}


def apply_strategies(model, cfg: TrainConfig) -> dict[str, int]:
    """Set what trains; returns ``{"trainable": n, "total": n}`` parameter counts."""
    settings = {"vision": (cfg.vision, cfg.lora_vision), "text": (cfg.text, cfg.lora_text)}
    for name, tower in towers(model).items():
        strategy, lora = settings[name]
        if strategy == "frozen":
            tower.requires_grad_(False)
        elif strategy == "full":
            tower.requires_grad_(True)
        elif strategy == "lora":
            add_lora(tower, lora)
        elif strategy == "partial":
            tower.requires_grad_(False)
            for group in tower.layer_groups()[-cfg.unfreeze_last_n :]:
                group.requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def add_lora(tower: nn.Module, lora: LoraSettings) -> None:
    """Wrap ``tower.model`` with LoRA adapters; only they train."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules or default_lora_targets(tower)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    tower.requires_grad_(False)
    try:
        tower.model = get_peft_model(tower.model, config)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        names = sorted({n.split(".")[-1] for n, m in tower.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(f"LoRA target_modules={targets} do not match {type(tower).__name__}; "
                         f"its linear/conv module names are {names[:30]}") from err


def merge_lora(model, adapter_dir: str | Path | None = None) -> list[str]:
    """Save each LoRA tower's adapter under ``adapter_dir/<tower>/`` then merge it into the weights."""
    from peft import PeftModel

    merged = []
    for name, tower in towers(model).items():
        if isinstance(tower.model, PeftModel):
            if adapter_dir is not None:
                tower.model.save_pretrained(Path(adapter_dir) / name)
            tower.model = tower.model.merge_and_unload()
            merged.append(name)
    return merged
