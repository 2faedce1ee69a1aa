"""Pictures of what a model answers and where it looked: heatmap overlays, prediction cards, prediction grids.

The heatmap is the question->image attention of the fusion layers (``VQAPredictor.predict(...,
output_attentions=True)``: averaged over layers, heads and question tokens), one weight per cell of the vision
tower's grid. It is min-max scaled, upsampled bilinearly to the image and blended through a colormap, as
in Grad-CAM style overlays (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391). With a coarse grid
(easy-VQA at 64 px gives EfficientNet's 2 x 2) the map says which quadrant the model attended, no more, so
the prediction card also writes each cell's attention weight on it.

    vqakit predict   --checkpoint DIR --image img.png --question "what shape?" --output result.png
    vqakit visualize --checkpoint DIR --data.dataset easy-vqa --split test --output grid.png
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vqakit.data.images import load_image

# easy-VQA images are 64 px: draw them large enough to read, smoothly
MIN_SIDE = 256


def heatmap_overlay(image, attention: np.ndarray, alpha: float = 0.45, cmap: str = "jet",
                    min_side: int = MIN_SIDE) -> Image.Image:
    """``image`` (anything ``load_image`` takes) with ``attention`` (h, w) blended over it as a colour map.

    >>> out = heatmap_overlay(np.zeros((64, 64, 3), np.uint8), np.array([[0.1, 0.2], [0.3, 0.4]]))
    >>> out.size, out.mode
    ((256, 256), 'RGB')
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 2 or not attention.size or not np.isfinite(attention).all():
        raise ValueError(f"attention must be a finite (h, w) grid, got shape {attention.shape}")
    img = _upscaled(load_image(image), min_side)
    lo, hi = float(attention.min()), float(attention.max())
    scaled = (attention - lo) / (hi - lo) if hi > lo else np.zeros_like(attention)
    grid = Image.fromarray(scaled, mode="F").resize(img.size, Image.BILINEAR)  # bicubic overshoots a 2 x 2 grid
    colours = colormaps[cmap](np.clip(np.asarray(grid), 0.0, 1.0))[..., :3]  # (H, W, 3) in [0, 1]
    heat = Image.fromarray((colours * 255).astype(np.uint8), mode="RGB")
    return Image.blend(img, heat, alpha)


def _upscaled(img: Image.Image, min_side: int) -> Image.Image:
    side = min(img.size)
    if side >= min_side:
        return img
    factor = min_side / side
    return img.resize((round(img.width * factor), round(img.height * factor)), Image.BICUBIC)


def render_predictions(image, predictions, output: str | Path, title: str | None = None) -> Path:
    """One row per question: the image (with its heatmap when the prediction has one) and the top-k answers as
    bars with their scores. Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not predictions:
        raise ValueError("no predictions to draw")
    base = load_image(image)
    rows = len(predictions)
    fig, axes = plt.subplots(rows, 2, figsize=(9, 4 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.1]})
    for (ax_img, ax_bar), p in zip(axes, predictions):
        shown = heatmap_overlay(base, p.attention) if p.attention is not None else _upscaled(base, MIN_SIDE)
        ax_img.imshow(shown)
        ax_img.set_axis_off()
        if p.attention is not None and p.attention.size <= 16:  # a coarse grid: show each cell's weight
            h, w = p.attention.shape
            for (r, c), value in np.ndenumerate(p.attention):
                ax_img.text((c + 0.5) * shown.width / w, (r + 0.5) * shown.height / h, f"{value:.2f}",
                            ha="center", va="center", fontsize=11, color="white",
                            bbox={"boxstyle": "round", "facecolor": "black", "alpha": 0.45, "linewidth": 0})
        ax_img.set_title(("attention heatmap" if p.attention is not None else "image"), fontsize=10)
        labels = [a for a, _ in p.top_k][::-1]
        scores = [s for _, s in p.top_k][::-1]
        colours = ["#9bb7d4"] * (len(labels) - 1) + ["#1f6fb4"]
        bars = ax_bar.barh(range(len(labels)), scores, color=colours)
        ax_bar.set_yticks(range(len(labels)), labels, fontsize=11)
        ax_bar.set_xlim(0, 1.18)
        ax_bar.bar_label(bars, labels=[f"{s:.3f}" for s in scores], padding=3, fontsize=10)
        ax_bar.spines[["top", "right"]].set_visible(False)
        ax_bar.set_xlabel("score")
        ax_bar.set_title(f"Q: {_wrap(p.question, 48)}\nA: {p.answer} ({p.score:.3f})", fontsize=11, loc="left")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def majority_answer(answers: list[str]) -> str:
    """The most frequent human answer (ties: the first given).

    >>> majority_answer(["2", "two", "2"])
    '2'
    """
    return Counter(answers).most_common(1)[0][0] if answers else ""


def render_grid(examples, predictions, output: str | Path, columns: int = 4, title: str | None = None) -> Path:
    """A grid of predictions vs ground truth: each cell shows the image (with its heatmap when there is one),
    the question, the predicted answer with its score and the majority human answer, green when the
    prediction scores in the official VQA metric and red when it does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vqakit.eval.vqa_accuracy import vqa_accuracy

    if len(examples) != len(predictions) or not examples:
        raise ValueError(f"need as many predictions as examples (got {len(predictions)} and {len(examples)}), "
                         "at least one")
    if columns < 1:
        raise ValueError(f"columns={columns} must be at least 1")
    columns = min(columns, len(examples))
    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 4.1 * rows), squeeze=False)
    correct = 0.0
    for ax, e, p in zip(axes.flat, examples, predictions):
        shown = heatmap_overlay(e.image, p.attention) if p.attention is not None else _upscaled(load_image(e.image),
                                                                                                MIN_SIDE)
        score = vqa_accuracy(p.answer, e.answers) if e.answers else 0.0
        correct += score
        ax.imshow(shown)
        ax.set_xticks([])
        ax.set_yticks([])
        colour = "#1a7f37" if score > 0 else "#cf222e"
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        ax.set_title(_wrap(e.question, 34), fontsize=9)
        ax.set_xlabel(f"pred: {p.answer} ({p.score:.2f})\ntrue: {majority_answer(e.answers)}", fontsize=10,
                      color=colour)
    for ax in list(axes.flat)[len(examples):]:
        ax.set_axis_off()
    heading = f"{title + ': ' if title else ''}VQA accuracy {100 * correct / len(examples):.1f}% on these " \
              f"{len(examples)} questions"
    fig.suptitle(heading, fontsize=12)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3]) or text
