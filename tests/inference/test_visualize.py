"""Heatmap overlays and the PNGs of `vqakit predict --output` and `vqakit visualize`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vqakit.cli import main
from vqakit.data.sources import easy_vqa_data_dir
from vqakit.inference.visualize import heatmap_overlay


def test_overlay_is_hot_where_the_attention_is():
    grey = np.full((64, 64, 3), 128, np.uint8)
    out = np.asarray(heatmap_overlay(grey, np.array([[0.0, 0.0], [0.0, 1.0]]), alpha=0.5)).astype(int)
    assert out.shape == (256, 256, 3)  # small images are drawn larger
    hot, cold = out[-20:, -20:].mean((0, 1)), out[:20, :20].mean((0, 1))
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40  # jet: red where attended, blue where not
    flat = np.asarray(heatmap_overlay(grey, np.ones((2, 2)), alpha=0.0))
    assert np.abs(flat.astype(int) - 128).max() <= 1  # alpha 0 leaves the image as it was
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(grey, np.ones((2, 2)), alpha=2)
    with pytest.raises(ValueError, match="finite"):
        heatmap_overlay(grey, np.full((2, 2), np.nan))


def test_predict_output_writes_the_heatmap_png(tiny_checkpoint, tmp_path, capsys):
    image = str(easy_vqa_data_dir() / "test" / "images" / "0.png")
    out = tmp_path / "result.png"
    main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", image, "--question", "what is the color?",
          "--question+", "is there a circle?", "--output", str(out), "--backend", "torch"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and printed.count("  5. ") == 2
    png = Image.open(out)
    assert png.format == "PNG" and png.width >= 800 and png.height >= 700  # two rows: image + top-5 bars each


def test_visualize_writes_a_grid(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["visualize", "--checkpoint", str(tiny_checkpoint), "--data.dataset", "easy-vqa", "--data.limit", "12",
          "--split", "test", "--num", "6", "--columns", "3", "--output", str(out)])
    assert "6 questions of easy-vqa test" in capsys.readouterr().out
    png = Image.open(out)
    assert png.format == "PNG" and png.width > png.height  # 3 columns x 2 rows
    main(["visualize", "--checkpoint", str(tiny_checkpoint), "--data.limit", "12", "--num", "2", "--errors_only",
          "true", "--heatmap", "false", "--output", str(tmp_path / "errors.png")])
    assert (tmp_path / "errors.png").is_file()  # a random tiny model gets some wrong


def test_visualize_rejects_bad_arguments(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["visualize", "--checkpoint", str(tiny_checkpoint), "--num", "0", "--output", str(tmp_path / "x.png")])
    assert "--num=0 must be at least 1" in capsys.readouterr().err
