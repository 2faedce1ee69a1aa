"""Frozen-tower features through the disk cache: images and questions encoded once, reused across runs.

Used by training (frozen towers never run per step) and by evaluation of a checkpoint whose towers
were frozen (the namespace hashes the tower weights, so such a checkpoint hits the training cache).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from vqakit.data.cache import FeatureCache, default_cache_dir, file_digests, text_digest
from vqakit.data.images import ImageLoadError, load_image


FORWARD_BATCH = 4  # images per vision-tower forward while caching (see cache_image_features)


def tower_fingerprint(module: nn.Module, *extra) -> str:
    """A short hash of a module's parameters and buffers plus ``extra`` settings."""
    h = hashlib.sha1(repr(extra).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.rstrip("/").split("/")[-1])[:40]


def image_cache_namespace(cfg, vision: nn.Module) -> str:
    """The cache folder of ``vision``'s features under ``cfg`` (a config with ``vision``, ``image_mean``,
    ``image_std``): the tower, the input size and a hash of the weights and of the options that change the
    features. Options at their defaults add nothing, so caches written before an option existed stay valid."""
    v = cfg.vision
    return f"vision-{_slug(v.name)}-{v.image_size}-" + tower_fingerprint(
        vision, v.image_size, cfg.image_mean, cfg.image_std, v.multiscale,
        *([v.grid_stride] if v.grid_stride != 32 else []),
        *(["truncate"] if v.truncate else []),
        *(["color_stats"] if v.color_stats else []),
    )


def text_cache_namespace(cfg, text: nn.Module, tokenizer_name: str) -> str:
    """The cache folder of ``text``'s question states under ``cfg`` (a config with ``text``): the tower, the
    padded length and a hash of the weights and the tokenizer."""
    T = cfg.text.max_length
    return f"text-{_slug(cfg.text.name)}-{T}-" + tower_fingerprint(text, T, tokenizer_name)


@torch.inference_mode()
def cache_image_features(model, processor, image_paths: list[str], cache_root=None, batch_size: int = 64,
                         progress: bool = True, workers: int = 4,
                         on_error: Callable[[str, ImageLoadError], None] | None = None
                         ) -> tuple[FeatureCache, list[str | None]]:
    """Encode every image with the (frozen) vision tower; returns the cache and one key per path.
    Images are decoded by ``workers`` threads, ahead of the tower; finished shards survive a killed build.

    Without ``on_error`` a broken image raises. With it, a file that cannot be read or decoded is skipped,
    ``on_error(path, ImageLoadError)`` is called once per such path (the decode is the image check: no second
    pass is needed) and its key is ``None`` if the file could not even be read."""
    cfg = model.config
    vision = model.backbone.vision.eval()
    namespace = image_cache_namespace(cfg, vision)
    cache = FeatureCache(cache_root or default_cache_dir() / "features", namespace)
    unique = list(dict.fromkeys(image_paths))
    digest = dict(zip(unique, file_digests(unique, workers=max(1, workers), missing_ok=on_error is not None)))
    reported = set()
    if on_error is not None:
        for path in unique:
            if digest[path] is None:  # unreadable: let load_image name the reason (missing, a directory, ...)
                on_error(path, _load_error(path))
                reported.add(path)

    def failed(path, error):
        if path not in reported:
            reported.add(path)
            on_error(path, error if isinstance(error, ImageLoadError) else
                     ImageLoadError(path, f"{type(error).__name__}: {error}"))

    keys = [digest[p] for p in image_paths]
    readable = [(k, p) for k, p in zip(keys, image_paths) if k is not None]

    def encode(pixels):  # a list of (3, S, S) tensors, decoded in a thread pool by cache.build
        # The tower runs FORWARD_BATCH images at a time in channels-last layout: on a CPU, a 64-image batch of
        # EfficientNet-Lite0 at 224 px (activations ~100 MB per layer) cost ~2.5x more CPU per image than
        # batches of 4, whose activations stay in cache (benchmarks/vqa_v2_scale.py, README "Data at scale").
        x = torch.stack(pixels).contiguous(memory_format=torch.channels_last)
        tokens = [vision(x[i : i + FORWARD_BATCH]) for i in range(0, len(x), FORWARD_BATCH)]
        return {"tokens": torch.cat(tokens).to(torch.float16).numpy()}  # (B, N, D)

    # shards of 512 images: a killed build loses at most 511 encoded images when it is run again
    cache.build([k for k, _ in readable], [p for _, p in readable], encode, batch_size=batch_size, shard_size=512,
                desc="image features", progress=progress, load=processor.image, workers=workers,
                on_error=None if on_error is None else failed)
    return cache, [None if p in reported else k for k, p in zip(keys, image_paths)]


def _load_error(path: str) -> ImageLoadError:
    try:
        load_image(path).close()
    except ImageLoadError as e:
        return e
    except Exception as e:
        return ImageLoadError(path, f"{type(e).__name__}: {e}")
    return ImageLoadError(path, "cannot read the file")


@torch.inference_mode()
def cache_text_features(model, processor, questions: list[str], cache_root=None, batch_size: int = 256,
                        progress: bool = True) -> tuple[FeatureCache, list[str]]:
    """Encode every distinct question with the (frozen) text tower, padded to ``text.max_length``."""
    text = model.backbone.text.eval()
    T = model.config.text.max_length
    namespace = text_cache_namespace(model.config, text, processor.tokenizer.name_or_path)
    cache = FeatureCache(cache_root or default_cache_dir() / "features", namespace)
    keys = [text_digest(q) for q in questions]

    def encode(batch):
        enc = processor.tokenizer(batch, padding="max_length", truncation=True, max_length=T, return_tensors="pt")
        states = text(enc["input_ids"], enc["attention_mask"])
        return {"states": states.to(torch.float16).numpy(), "mask": enc["attention_mask"].to(torch.uint8).numpy()}

    cache.build(keys, questions, encode, batch_size=batch_size, desc="question features", progress=progress)
    return cache, keys

