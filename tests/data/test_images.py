"""Tests for vqakit.data.images: every mode to RGB, EXIF, broken files, bombs, scanning and filtering."""

import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from vqakit.data.example import Example
from vqakit.data.images import ImageCheckReport, ImageLoadError, filter_examples, load_image, scan_images

WHITE = (255, 255, 255)


def close_to(pixel, expected, tol=3):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def save(image, path, fmt=None, **kwargs):
    image.save(path, fmt, **kwargs)
    return path


def noisy_jpeg(path, size=(64, 48), seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return save(Image.fromarray(a), path, "JPEG", quality=90)


# ----------------------------------------------------------------------------------- mode conversion


def palette_with_transparency():
    im = Image.new("P", (4, 2), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    im.putpixel((3, 1), 1)
    im.info["transparency"] = 0  # red is the transparent index
    return im


def rgba():
    im = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red -> white
    im.putpixel((3, 1), (0, 0, 255, 255))  # opaque blue
    im.putpixel((2, 1), (255, 0, 0, 128))  # half-transparent red over white -> pink
    return im


def la():
    im = Image.new("LA", (4, 2), (0, 0))  # transparent black -> white
    im.putpixel((3, 1), (0, 255))  # opaque black
    return im


def cmyk():
    im = Image.new("CMYK", (4, 2), (0, 0, 0, 0))  # no ink -> white
    im.putpixel((3, 1), (0, 255, 255, 0))  # magenta + yellow -> red
    return im


def grey():
    im = Image.new("L", (4, 2), 255)
    im.putpixel((3, 1), 100)
    return im


def sixteen_bit():
    a = np.full((2, 4), 65535, dtype=np.uint16)
    a[1, 3] = 32896  # 32896 / 257 = 128
    return Image.fromarray(a)


def one_bit():
    im = Image.new("1", (4, 2), 1)
    im.putpixel((3, 1), 0)
    return im


# (name, builder, file format, expected mode after a round trip, pixel (3, 1) as RGB)
MODES = [
    ("P+transparency", palette_with_transparency, "PNG", "P", (0, 0, 255)),
    ("RGBA", rgba, "PNG", "RGBA", (0, 0, 255)),
    ("LA", la, "PNG", "LA", (0, 0, 0)),
    ("CMYK", cmyk, "TIFF", "CMYK", (255, 0, 0)),
    ("L", grey, "PNG", "L", (100, 100, 100)),
    ("I;16", sixteen_bit, "PNG", "I;16", (128, 128, 128)),
    ("1", one_bit, "PNG", "1", (0, 0, 0)),
]


@pytest.mark.parametrize("name,build,fmt,mode,pixel", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("via", ["file", "pil", "bytes"])
def test_every_mode_converts_to_rgb(tmp_path, via, name, build, fmt, mode, pixel):
    path = save(build(), tmp_path / f"image.{fmt.lower()}", fmt)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really holds the mode under test
    if via == "pil":
        with Image.open(path) as source:
            out = load_image(source)
    else:
        out = load_image(path if via == "file" else path.read_bytes())
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == WHITE  # transparent / no ink / white / max value all read as white
    assert close_to(out.getpixel((3, 1)), pixel)


def test_half_transparent_is_composited_on_white(tmp_path):
    out = load_image(save(rgba(), tmp_path / "a.png"))
    assert close_to(out.getpixel((2, 1)), (255, 127, 127), tol=2)


def test_sixteen_bit_uses_full_range(tmp_path):
    a = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(2, 8)
    out = np.asarray(load_image(save(Image.fromarray(a), tmp_path / "g16.png")))
    assert out[0, 0, 0] == 0 and out[1, 7, 0] == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) > 0)  # not clipped to a flat white


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG", quality=95)
    out = load_image(path)
    assert out.mode == "RGB" and close_to(out.getpixel((4, 4)), (255, 0, 0), tol=8)


def test_input_pil_image_is_not_modified():
    im = Image.new("RGBA", (5, 3), (0, 0, 0, 0))
    out = load_image(im)
    assert out is not im and im.mode == "RGBA" and out.getpixel((0, 0)) == WHITE


# ----------------------------------------------------------------------------------------------- EXIF


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))  # stored sideways: left half red, right half blue
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = save(stored, tmp_path / "phone.jpg", "JPEG", exif=exif.tobytes(), quality=95)

    out = load_image(path)
    assert out.size == (20, 40)  # width and height swapped
    assert close_to(out.getpixel((10, 5)), (255, 0, 0), tol=10)  # the left half is now on top
    assert close_to(out.getpixel((10, 35)), (0, 0, 255), tol=10)


# --------------------------------------------------------------------------------------- broken files


def test_truncated_jpeg_fails_at_load_time(tmp_path):
    good = noisy_jpeg(tmp_path / "good.jpg")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with Image.open(path) as im:
        assert im.size == (64, 48)  # the header alone looks fine: only a full decode notices
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    assert str(path) in str(e.value) and "truncated" in e.value.reason
    assert e.value.source == path and isinstance(e.value, ValueError)


def test_garbage_bytes_fail(tmp_path):
    path = tmp_path / "error_page.jpg"
    path.write_bytes(b"<html><body>403 Forbidden</body></html>")
    with pytest.raises(ImageLoadError, match="error_page.jpg") as e:
        load_image(path)
    assert "not a recognised image" in e.value.reason
    with pytest.raises(ImageLoadError, match="bytes"):
        load_image(b"\x00\x01 definitely not an image")


def test_missing_file_fails(tmp_path):
    path = tmp_path / "nope" / "COCO_val2014_000000000042.jpg"
    with pytest.raises(ImageLoadError, match="COCO_val2014_000000000042.jpg") as e:
        load_image(str(path))
    assert "not found" in e.value.reason and e.value.source == str(path)


def test_empty_file_fails(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(tmp_path / "empty.png")


# ---------------------------------------------------------------------------------- decompression bomb


def test_max_pixels_guard(tmp_path):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="max_pixels") as e:
        load_image(path, max_pixels=9_999)
    assert str(path) in str(e.value)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(np.zeros((100, 100), dtype=np.uint8), max_pixels=50)


def test_pillow_bomb_error_and_warning_are_caught(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # 10,000 > 2 * 4,000: Pillow raises
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # between 1x and 2x: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (100, 100)  # our own max_pixels decides, no warning escapes
        with pytest.raises(ImageLoadError):
            load_image(path, max_pixels=6_000)


# ------------------------------------------------------------------------------------- in-memory input


@pytest.mark.parametrize(
    "array,pixel",
    [
        (np.full((3, 5), 200, dtype=np.uint8), (200, 200, 200)),
        (np.full((3, 5, 1), 7, dtype=np.uint8), (7, 7, 7)),
        (np.tile(np.array([1, 2, 3], dtype=np.uint8), (3, 5, 1)), (1, 2, 3)),
        (np.tile(np.array([0, 0, 255, 0], dtype=np.uint8), (3, 5, 1)), WHITE),  # transparent
        (np.tile(np.array([0, 0, 255, 255], dtype=np.uint8), (3, 5, 1)), (0, 0, 255)),
        (np.full((3, 5, 3), 0.5, dtype=np.float32), (128, 128, 128)),
        (np.ones((3, 5), dtype=np.float64), WHITE),
        (np.zeros((3, 5), dtype=bool), (0, 0, 0)),
    ],
)
def test_numpy_input(array, pixel):
    out = load_image(array)
    assert out.mode == "RGB" and out.size == (5, 3) and out.getpixel((4, 2)) == pixel


@pytest.mark.parametrize(
    "array,match",
    [
        (np.full((3, 5), 2.0), r"\[0, 1\]"),
        (np.full((3, 5), np.nan), "NaN"),
        (np.zeros((3, 5, 2), dtype=np.uint8), "shape"),
        (np.zeros((2, 3, 5, 3), dtype=np.uint8), "shape"),
        (np.zeros((3, 5), dtype=np.int64), "dtype"),
    ],
)
def test_bad_numpy_input(array, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(array)


def test_bytes_input_and_unsupported_type():
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(bytearray(buf.getvalue())).size == (6, 4)
    with pytest.raises(ImageLoadError, match="unsupported input type"):
        load_image(12345)


# --------------------------------------------------------------------------------- scanning, filtering


@pytest.fixture
def mixed_images(tmp_path):
    paths = {i: str(noisy_jpeg(tmp_path / f"{i}.jpg", seed=i)) for i in range(6)}
    truncated = tmp_path / "3.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tmp_path / "4.jpg").write_bytes(b"GIF? no.")
    paths[7] = str(tmp_path / "missing.jpg")
    return paths


def test_scan_images_reports_bad_ids_without_raising(mixed_images):
    report = scan_images(mixed_images, workers=3, progress=False)
    assert report.ok == [0, 1, 2, 5]
    assert [image_id for image_id, _, _ in report.bad] == [3, 4, 7]
    reasons = {image_id: reason for image_id, _, reason in report.bad}
    assert "truncated" in reasons[3] and "not a recognised" in reasons[4] and "not found" in reasons[7]
    assert report.bad[2][1] == mixed_images[7]
    assert report.summary() == "7 images checked: 4 ok, 3 bad (ids: 3, 4, 7)"


def test_scan_images_with_progress_bar(mixed_images, capsys):
    report = scan_images(mixed_images, workers=1, progress=True)
    assert len(report.ok) + len(report.bad) == len(mixed_images)
    assert "checking images" in capsys.readouterr().err


def test_summary_truncates_long_id_lists():
    report = ImageCheckReport(ok=[], bad=[(i, f"{i}.jpg", "x") for i in range(25)])
    assert report.summary(max_ids=3) == "25 images checked: 0 ok, 25 bad (ids: 0, 1, 2, ... (+22 more))"


def test_filter_examples_drops_bad_images_and_warns(mixed_images, caplog):
    examples = [
        Example(image=path, question=f"q{k}", question_id=10 * image_id + k, image_id=image_id, answers=["yes"])
        for image_id, path in mixed_images.items()
        for k in range(2)
    ]
    report = scan_images(mixed_images, progress=False)
    with caplog.at_level(logging.WARNING, logger="vqakit"):
        kept = filter_examples(examples, report)
    assert sorted({ex.image_id for ex in kept}) == [0, 1, 2, 5] and len(kept) == 8
    record = next(r for r in caplog.records if r.name == "vqakit")
    assert record.levelno == logging.WARNING
    assert "dropped 6 of 14" in record.getMessage() and "[3, 4, 7]" in record.getMessage()

    caplog.clear()
    assert filter_examples(kept, report) == kept  # nothing left to drop: no warning
    assert not caplog.records
