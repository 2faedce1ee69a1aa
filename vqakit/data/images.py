"""Load any image a user or a dataset hands us as a fully decoded RGB ``PIL.Image``, or fail clearly.

Real VQA corpora contain a few broken files (truncated downloads, HTML error pages saved as ``.jpg``,
CMYK or 16-bit scans, phone photos whose rotation lives only in EXIF). ``load_image`` is the single
entry point that turns all of them into the same thing the processors expect: an RGB image, upright,
with transparency composited on white, or an ``ImageLoadError`` that names the file and the reason.

``scan_images`` checks a whole split up front (in a thread pool, with a progress bar) and
``filter_examples`` drops the questions whose image failed, so a bad file costs one warning
instead of a crash hours into training.

References:
    - Pillow modes: https://pillow.readthedocs.io/en/stable/handbook/concepts.html#modes
    - EXIF orientation: ``PIL.ImageOps.exif_transpose``
    - Decompression bombs: https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.open

Example:
    >>> import numpy as np
    >>> load_image(np.zeros((4, 6), dtype=np.uint8)).size
    (6, 4)
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from vqakit.data.example import Example

logger = logging.getLogger("vqakit")

# Pillow's own default limit (Image.MAX_IMAGE_PIXELS): about a 9459 x 9459 image, 256 MiB as RGBA.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# ``warnings.catch_warnings`` swaps a process-wide filter list; serialise it so threads of
# ``scan_images`` cannot interleave their save/restore and leak a filter.
_WARNINGS_LOCK = threading.Lock()

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image could not be loaded.

    Attributes:
        source: what was passed in (the path, or a short description of in-memory input).
        reason: why it failed, in words, with a hint on how to fix it where there is one.
    """

    def __init__(self, source: object, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"Cannot load image {_describe(source)}: {reason}")


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<numpy array shape={source.shape} dtype={source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` as a fully decoded, upright RGB image.

    Args:
        source: a file path (``str`` / ``Path``), the encoded file as ``bytes``, a ``PIL.Image``
            (not modified), or a numpy array of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
            ``(H, W, 4)`` with dtype ``uint8`` (0..255), ``bool``, or float in ``[0, 1]``.
        max_pixels: reject images with more than ``width * height`` pixels before decoding them
            (decompression-bomb guard). Pillow's own hard limit, ``2 * PIL.Image.MAX_IMAGE_PIXELS``,
            still applies on top of it.

    Returns:
        A new ``PIL.Image`` in mode ``RGB``. EXIF orientation is applied; transparency (RGBA, LA,
        palette with a transparent index) is composited on white; CMYK, L, 1-bit, 16-bit (``I;16``,
        ``I``) and float (``F``) images are converted with their full range mapped to 0..255.

    Raises:
        ImageLoadError: (a ``ValueError``) the file is missing, truncated, not an image, too large,
            or the array has an unsupported shape/dtype. The message names the source and reason.

    Example:
        >>> import io
        >>> buf = io.BytesIO(); Image.new("LA", (3, 2), (0, 0)).save(buf, "PNG")
        >>> load_image(buf.getvalue()).getpixel((0, 0))  # fully transparent -> white
        (255, 255, 255)
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels={max_pixels} must be a positive number of pixels")
    if isinstance(source, np.ndarray):
        image = _image_from_array(source)
        _check_pixels(source, image.size, max_pixels)
        return _to_rgb(image)
    if isinstance(source, Image.Image):
        _check_pixels(source, source.size, max_pixels)
        return _finish(source, source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(source, "the data is empty (0 bytes)")
        return _open_and_finish(source, io.BytesIO(bytes(source)), max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageLoadError(source, "file not found; check the path and the dataset's image folder")
        if os.path.isdir(path):
            raise ImageLoadError(source, "is a directory, not an image file")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(source, "the file is empty (0 bytes); re-download or re-extract it")
        return _open_and_finish(source, path, max_pixels)
    raise ImageLoadError(
        source,
        f"unsupported input type {type(source).__name__}; pass a path, bytes, a PIL.Image or a numpy array",
    )


def _check_pixels(source: object, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageLoadError(
            source,
            f"{w} x {h} = {w * h:,} pixels exceeds max_pixels={max_pixels:,} (decompression-bomb guard); "
            "pass a larger max_pixels if you trust this image",
        )


def _open_and_finish(source: object, fp: str | io.BytesIO, max_pixels: int) -> Image.Image:
    try:
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that. We enforce our own
        # ``max_pixels`` just below, so the warning is recorded rather than shown; the error is reported.
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True):
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(
            source,
            f"decompression-bomb guard of Pillow: {e}; raise PIL.Image.MAX_IMAGE_PIXELS if you trust this image",
        ) from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(source, "not a recognised image format (is it an HTML page or a partial download?)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow plugins raise all of these on bad headers
        raise ImageLoadError(source, _decode_failure(e)) from e
    try:
        _check_pixels(source, image.size, max_pixels)
        return _finish(source, image)
    finally:
        image.close()


def _finish(source: object, image: Image.Image) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert to RGB. Always returns a new image."""
    try:
        image.load()  # decode every byte now, so a truncated file fails here and not in a DataLoader worker
    except Image.DecompressionBombError as e:
        raise ImageLoadError(source, f"decompression-bomb guard of Pillow: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(source, _decode_failure(e)) from e
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as e:  # a corrupt EXIF block must not cost us an otherwise good image
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", _describe(source), e)
        upright = image
    rgb = _to_rgb(upright)
    return rgb.copy() if rgb is image else rgb


def _decode_failure(e: BaseException) -> str:
    message = str(e) or type(e).__name__
    if "truncated" in message.lower() or isinstance(e, EOFError):
        return f"the file is truncated ({message}); re-download or re-extract it"
    return f"cannot read or decode the image data ({type(e).__name__}: {message})"


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        # Pillow's convert("RGB") clips these to 0..255 instead of rescaling, which turns a
        # 16-bit scan almost entirely white. Map the full range to 8 bits ourselves.
        return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, RGBX, ...
    except ValueError as e:
        raise ImageLoadError(image, f"cannot convert mode {mode!r} to RGB ({e})") from e


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Rescale a single-channel 16-bit / 32-bit / float array to uint8."""
    a = a.astype(np.float64)
    if mode == "F" and a.size and 0.0 <= a.min() and a.max() <= 1.0:
        a = a * 255.0
    elif mode != "F" and a.size and 0 <= a.min() and a.max() <= 65535:
        a = a / 257.0  # 65535 -> 255: the 16-bit range, as PNG / TIFF store it
    elif a.size:  # anything else (negative, > 16 bit, arbitrary floats): min-max stretch
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _image_from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageLoadError(a, "expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageLoadError(a, "the array is empty")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageLoadError(a, "float array holds NaN or inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageLoadError(
                a,
                f"float arrays must lie in [0, 1] but values span [{lo:g}, {hi:g}]; "
                "divide by 255 or cast to uint8 first",
            )
        a = np.rint(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageLoadError(a, f"unsupported dtype {a.dtype}; use uint8 (0..255) or float in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.ndim if a.ndim == 2 else a.shape[2]]
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


@dataclass
class ImageCheckReport:
    """Result of ``scan_images``.

    Args:
        ok: ids of the images that decoded, sorted.
        bad: ``(id, path, reason)`` for every image that did not, sorted by id.
    """

    ok: list[int] = field(default_factory=list)
    bad: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def bad_ids(self) -> set[int]:
        """The ids of the images that failed."""
        return {image_id for image_id, _, _ in self.bad}

    def summary(self, max_ids: int = 10) -> str:
        """One line: how many were checked, how many failed and the first failing ids.

        >>> ImageCheckReport(ok=[1, 2], bad=[(7, "a.jpg", "file not found")]).summary()
        '3 images checked: 2 ok, 1 bad (ids: 7)'
        """
        total = len(self.ok) + len(self.bad)
        line = f"{total} images checked: {len(self.ok)} ok, {len(self.bad)} bad"
        if self.bad:
            ids = [str(image_id) for image_id, _, _ in self.bad[:max_ids]]
            more = f", ... (+{len(self.bad) - max_ids} more)" if len(self.bad) > max_ids else ""
            line += f" (ids: {', '.join(ids)}{more})"
        return line


def scan_images(
    paths: dict[int, str],
    workers: int = 2,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageCheckReport:
    """Fully decode every image in ``paths`` and report which ones fail. Never raises on a bad image.

    Decoding releases the GIL inside Pillow, so a thread pool gives a real speed-up.

    Args:
        paths: image id -> image path.
        workers: number of threads.
        progress: show a tqdm bar.
        max_pixels: passed on to ``load_image``.

    Example:
        >>> report = scan_images({1: "/no/such/file.jpg"}, progress=False)
        >>> report.bad[0][0], report.bad[0][2].startswith("file not found")
        (1, True)
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")

    def check(image_id: int, path: str) -> tuple[int, str, str | None]:
        try:
            load_image(path, max_pixels=max_pixels).close()
            return image_id, path, None
        except ImageLoadError as e:
            return image_id, path, e.reason
        except Exception as e:  # anything Pillow did not anticipate still must not stop the scan
            return image_id, path, f"{type(e).__name__}: {e}"

    report = ImageCheckReport()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check, image_id, path) for image_id, path in paths.items()]
        bar = tqdm(total=len(futures), desc="checking images", unit="img", disable=not progress)
        for future in as_completed(futures):
            image_id, path, reason = future.result()
            if reason is None:
                report.ok.append(image_id)
            else:
                report.bad.append((image_id, str(path), reason))
            bar.update(1)
        bar.close()
    report.ok.sort()
    report.bad.sort(key=lambda item: item[0])
    return report


def filter_examples(examples: Iterable[Example], report: ImageCheckReport) -> list[Example]:
    """Drop the examples whose ``image_id`` is in ``report.bad``, logging a warning if any are dropped.

    ``report`` must come from scanning this split's images (ids are only unique within a split).
    """
    examples = list(examples)
    bad_ids = report.bad_ids
    if not bad_ids:
        return examples
    kept = [ex for ex in examples if ex.image_id not in bad_ids]
    dropped = len(examples) - len(kept)
    if dropped:
        hit = sorted({ex.image_id for ex in examples if ex.image_id in bad_ids})
        more = f" (+{len(hit) - 10} more)" if len(hit) > 10 else ""
        logger.warning(
            "dropped %d of %d examples whose image failed to load (%d images, ids: %s%s)",
            dropped, len(examples), len(hit), hit[:10], more,
        )
    return kept
