"""Training strategies, one explicit knob per tower: ``frozen``, ``lora`` (PEFT), ``full``, ``partial`` or ``qlora``.

Fusion layers and the head always train. ``frozen`` towers do not run during training at all: their
outputs come from the feature cache. ``lora`` wraps the tower's network in a PEFT model
(``get_peft_model``), so only the low-rank updates train; at save time the adapter is written in
PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) and then merged, so the
checkpoint's ``model.safetensors`` serves at full speed with no PEFT dependency. ``partial`` trains
only the tower's last ``unfreeze_last_n`` layer groups (stage 2 of two-stage training, as in seed 003's
"unfreeze the last N layers"). ``qlora`` (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) swaps the
tower's linear layers for bitsandbytes 4-bit NF4 ones (quantized when the model moves to the GPU), then adds
LoRA; at save time the base is dequantized and the adapter merged in float32.

GPU-only options (QLoRA, 8-bit AdamW, fp16) are checked by ``check_device_support`` before anything loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vqakit.train.config import LoraSettings, TrainConfig, check_lora_layers

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


def uses_cuda(cfg: TrainConfig) -> bool:
    if cfg.accelerator in ("gpu", "cuda"):
        return True
    return cfg.accelerator == "auto" and torch.cuda.is_available()


def check_device_support(cfg: TrainConfig, cuda: bool | None = None) -> str:
    """Fail early on options this device cannot run; returns the precision to train with.

    QLoRA and 8-bit AdamW need CUDA (bitsandbytes' 4-bit layers and 8-bit optimizers), and so does
    Lightning's FSDP strategy (it raises for ``accelerator='cpu'``, even with gloo); fp16 needs a GPU
    (``16-mixed`` falls back to ``bf16-mixed`` on CPU, as Lightning does; ``16-true`` is an error).
    """
    cuda = uses_cuda(cfg) if cuda is None else cuda
    needs = []
    if "qlora" in (cfg.vision, cfg.text):
        needs.append("QLoRA (--train.vision/--train.text qlora)")
    if cfg.optimizer == "adamw8bit":
        needs.append("8-bit AdamW (--train.optimizer adamw8bit)")
    if cfg.precision == "16-true":
        needs.append("fp16 weights (--train.precision 16-true)")
    if cfg.strategy.startswith("fsdp"):  # Lightning's FSDPStrategy refuses CPU accelerators (checked, 2.6)
        needs.append("FSDP (--train.strategy fsdp; use ddp on CPU)")
    if needs and not cuda:
        raise RuntimeError(f"{' and '.join(needs)} need a CUDA GPU, and this run is on CPU "
                           f"(--train.accelerator={cfg.accelerator}, CUDA available: {torch.cuda.is_available()}); "
                           f"on CPU use lora, --train.optimizer adamw, --train.precision bf16-mixed or 32-true")
    if "qlora" in (cfg.vision, cfg.text) or cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise RuntimeError(f"{' and '.join(needs)} need bitsandbytes: pip install 'vqakit[gpu]'") from err
    if cfg.precision == "16-mixed" and not cuda:
        logging.getLogger("vqakit").warning("--train.precision 16-mixed: fp16 AMP needs a GPU; using bf16-mixed on CPU")
        return "bf16-mixed"
    return cfg.precision


def quantize_4bit(tower: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap the tower's ``nn.Linear`` layers for bitsandbytes NF4 ``Linear4bit`` (double-quantized, as QLoRA);
    the weights are quantized when the model moves to the GPU. Returns how many layers were swapped."""
    import bitsandbytes as bnb

    from vqakit.towers.vision import EfficientNetLiteTower

    if isinstance(tower, EfficientNetLiteTower):
        raise NotImplementedError("QLoRA quantizes linear layers and EfficientNet-Lite is convolutions: use "
                                  "--train.vision lora (or a transformers vision tower)")
    swapped = 0
    for parent in list(tower.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                swapped += 1
    return swapped


def dequantize_4bit(module: nn.Module) -> int:
    """Swap ``Linear4bit`` layers back for float32 ``nn.Linear`` (the dequantized NF4 weights)."""
    import bitsandbytes as bnb

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=w.device)
                linear.weight = nn.Parameter(w.float(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.data.float(), requires_grad=False)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


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
            add_lora(tower, lora, flag=f"--train.lora_{name}")
        elif strategy == "qlora":
            quantize_4bit(tower)
            add_lora(tower, lora, flag=f"--train.lora_{name}")
        elif strategy == "partial":
            tower.requires_grad_(False)
            for group in tower.layer_groups()[-cfg.unfreeze_last_n :]:
                group.requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def last_layers_targets(tower: nn.Module, targets: list[str], n: int, flag: str = "--train.lora_*") -> list[str]:
    """Full names (relative to ``tower.model``) of the ``targets`` modules in the last ``n`` of the tower's
    ``layer_groups()`` that hold any, matched as PEFT matches names (equal, or ending in ``.<target>``).

    Naming each module, rather than PEFT's ``layers_to_transform`` + ``layers_pattern``, works for every
    tower that lists its layers (``encoder.layer.<i>`` in BERT, ``_blocks.<i>`` in EfficientNet) and the
    adapter's ``adapter_config.json`` then says exactly which modules were adapted.
    """
    check_lora_layers(n, flag)
    names = {id(m): name for name, m in tower.model.named_modules()}
    layers = []
    for group in tower.layer_groups():
        hits = [names[id(m)] for m in group.modules()
                if id(m) in names and any(names[id(m)] == t or names[id(m)].endswith(f".{t}") for t in targets)]
        if hits:
            layers.append(hits)
    if not layers:  # no target matches at all: add_lora's PEFT error lists the module names there are
        return targets
    if n > len(layers):
        raise ValueError(f"{flag}.layers={n}: {type(tower).__name__} has only {len(layers)} layers with LoRA target "
                         f"modules {targets}; use 1..{len(layers)}, or 0 for every layer")
    return [name for hits in layers[-n:] for name in hits]


def wrap_lora(module: nn.Module, lora: LoraSettings, targets, **extra) -> nn.Module:
    """``module`` wrapped by PEFT with LoRA adapters of ``lora``'s rank, alpha and dropout on ``targets`` (module
    names or one regex); ``extra`` goes to ``LoraConfig`` (``modules_to_save``, ``task_type``, ...). PEFT raises
    a ``ValueError`` when no module matches ``targets``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        **extra)
    return get_peft_model(module, config)


def add_lora(tower: nn.Module, lora: LoraSettings, flag: str = "--train.lora_*") -> None:
    """Wrap ``tower.model`` with LoRA adapters; only they train.

    With ``lora.layers = N`` only the last N layers get adapters. Everything below them is frozen and
    its input needs no gradient, so autograd records nothing there: the forward pass runs as under
    ``no_grad`` and the backward pass stops at the lowest adapted layer (what makes LoRA cheaper than a
    full fine-tune in time, not just in optimizer state).
    """
    targets = lora.target_modules or default_lora_targets(tower)
    if lora.layers:
        targets = last_layers_targets(tower, targets, lora.layers, flag)
    tower.requires_grad_(False)
    try:
        tower.model = wrap_lora(tower.model, lora, targets)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        names = sorted({n.split(".")[-1] for n, m in tower.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(f"LoRA target_modules={targets} ({flag}.target_modules) do not match {type(tower).__name__}; "
                         f"its linear/conv module names are {names[:30]}") from err


def merge_lora(model, adapter_dir: str | Path | None = None) -> list[str]:
    """Save each LoRA tower's adapter under ``adapter_dir/<tower>/`` then merge it into the weights."""
    from peft import PeftModel

    merged = []
    for name, tower in towers(model).items():
        if isinstance(tower.model, PeftModel):
            if adapter_dir is not None:
                tower.model.save_pretrained(Path(adapter_dir) / name)
            if any(type(m).__name__ == "Linear4bit" for m in tower.model.modules()):  # QLoRA
                if adapter_dir is None:
                    raise ValueError("merging a QLoRA tower needs adapter_dir (the adapter is re-applied in float32)")
                # merging into 4-bit weights would re-quantize the update away: dequantize the base, then merge
                base = tower.model.unload()
                dequantize_4bit(base)
                tower.model = PeftModel.from_pretrained(base, Path(adapter_dir) / name).merge_and_unload()
            else:
                tower.model = tower.model.merge_and_unload()
            merged.append(name)
    return merged
