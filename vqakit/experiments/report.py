"""``vqakit report``: a paper about one or more compare / train runs, in three formats from one outline.

- ``report.tex`` in IEEE two-column format (``IEEEtran`` conference class), compiled to ``report.pdf`` when
  ``pdflatex`` (or ``latexmk``) is on the PATH; see the README for the Debian packages.
- ``report.html`` (standalone, one file plus ``figures/``) and ``report.md``.

The paper has the approach, an architecture diagram generated from the run's model config (TikZ in the
PDF, the same layout drawn by matplotlib as ``figures/architecture.png`` for HTML/markdown and for TeX
installs without TikZ), the cost and quality tables, per-answer-type accuracy, the plots of
``vqakit compare`` (redrawn here from the runs' logs, so several run directories share one set), and a
discussion computed from the numbers (including the issue's LoRA-vs-full targets when both ran).

Everything is read from the run directories: ``comparison.json`` (compare), ``config.yaml``,
``checkpoint/training_metadata.json``, ``checkpoint/eval-*/metrics.json`` and
``checkpoint/model.safetensors`` (its tensor shapes only, for the per-component parameter counts).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from vqakit.models.checkpoint import nest_tower_keys

# what each strategy of ``vqakit compare`` does, one sentence each (the approach section)
STRATEGY_TEXT = {
    "frozen": "both towers frozen; their features are computed once and cached, and only the projections, "
              "fusion layers and classifier train",
    "lora": "low-rank adapters (LoRA, Hu et al. 2021) on both towers, trained with the fusion layers and the "
            "classifier; the pretrained tower weights stay fixed and the adapters are merged at save time",
    "full": "every weight trains, the towers with a lower learning rate than the new layers",
    "two-stage": "a frozen-tower stage, then the last layers of each tower are unfrozen and training continues "
                 "from the stage-1 weights; its time to train is that of both stages",
    "partial": "only the last layers of each tower train, with the fusion layers and the classifier",
}  # fmt: skip
LORA_TARGETS = {"max_trainable_percent": 2.0, "max_time_ratio": 0.6, "max_accuracy_loss": 0.5}


# -- the outline: sections of paragraphs, tables, figures and code, rendered three ways ----------------------------


@dataclass
class Table:
    caption: str
    label: str
    header: list[str]
    rows: list[list[str]]
    wide: bool = False  # spans both columns in the PDF


@dataclass
class Figure:
    path: str  # relative to the report directory
    caption: str
    label: str
    wide: bool = False
    tikz: str | None = None  # the PDF draws this instead of the PNG when TikZ is installed


@dataclass
class Code:
    text: str


@dataclass
class Items:
    items: list[str]


@dataclass
class Section:
    title: str
    # str paragraphs (with `code` spans and @tab:x / @fig:x references), Items, Table, Figure, Code
    blocks: list = field(default_factory=list)


@dataclass
class Paper:
    title: str
    abstract: str
    sections: list[Section]
    keywords: list[str]


# -- reading runs ----------------------------------------------------------------------------------------------------


def load_rows(run_dirs: list[str]) -> list[dict]:
    """Rows as ``vqakit compare`` writes them, from compare directories and/or single train runs, each with
    ``run_dirs`` resolved, ``config`` (the last stage's config.yaml) and ``metadata`` added."""
    from vqakit.experiments.compare import _row

    if not run_dirs:
        raise ValueError("vqakit report needs at least one run directory (a compare or train --train.out_dir)")
    rows = []
    for d in map(Path, run_dirs):
        if (d / "comparison.json").is_file():
            for r in json.loads((d / "comparison.json").read_text()):
                run = d / r["strategy"]
                stages = [run / "stage1", run / "stage2"] if (run / "stage2").is_dir() else [run]
                rows.append({**r, "run_dirs": [str(s) for s in stages], "source": str(d)})
        elif (d / "checkpoint" / "training_metadata.json").is_file():
            if not list((d / "checkpoint").glob("eval-*/metrics.json")):
                raise ValueError(f"{d} has no evaluation ({d}/checkpoint/eval-*/metrics.json): run "
                                 f"`vqakit evaluate --checkpoint {d}/checkpoint` first")
            rows.append({**_row(d.name, [d]), "source": str(d)})
        elif d.is_dir():
            raise ValueError(f"{d} is neither a `vqakit compare` directory (comparison.json) nor a finished "
                             f"`vqakit train` run (checkpoint/training_metadata.json)")
        else:
            raise FileNotFoundError(f"run directory {d} not found")
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["strategy"]] = seen.get(r["strategy"], 0) + 1
    for r in rows:  # the same strategy from two directories: name them apart
        if seen[r["strategy"]] > 1:
            r["strategy"] = f"{r['strategy']} ({Path(r['source']).name})"
    for r in rows:
        last = Path(r["run_dirs"][-1])
        r["config"] = yaml.safe_load((last / "config.yaml").read_text())
        r["config"]["model"] = nest_tower_keys(r["config"]["model"])  # a run of the flat layout too
        r["metadata"] = [json.loads((Path(s) / "checkpoint" / "training_metadata.json").read_text())
                         for s in r["run_dirs"]]
        r["metrics"] = json.loads(next((last / "checkpoint").glob("eval-*/metrics.json")).read_text())
    return rows


def parameter_breakdown(checkpoint: Path) -> dict:
    """Parameters per component and the towers' output widths, from the safetensors header (no weights read)."""
    from safetensors import safe_open

    parts = {"vision": 0, "text": 0, "projections": 0, "fusion": 0, "classifier": 0}
    widths = {}
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = math.prod(shape)
            if key.startswith("backbone.vision."):
                parts["vision"] += n
            elif key.startswith("backbone.text."):
                parts["text"] += n
            elif key.startswith("backbone.fusion."):
                parts["fusion"] += n
            elif key.startswith("classifier."):
                parts["classifier"] += n
            else:
                parts["projections"] += n
            if key in ("backbone.vision_proj.0.weight", "backbone.text_proj.0.weight"):
                widths[key.split("_")[0].split(".")[1]] = shape[1]  # (H, D_in)
    return {"parameters": parts, "vision_dim": widths.get("vision"), "text_dim": widths.get("text")}


# -- the architecture diagram: one layout, drawn by TikZ and by matplotlib -------------------------------------------


def _tower_name(name: str) -> str:
    return {"efficientnet-lite0": "EfficientNet-Lite0", "minilm-l6": "MiniLM-L6"}.get(name, Path(name).name)


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def diagram_nodes(model: dict, breakdown: dict, strategies: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Boxes (key, x, y in cm, lines of text, kind) and arrows of the model, from its config.json."""
    model = nest_tower_keys(model)  # a config.json of the flat layout too
    p, h, vision = breakdown["parameters"], model["hidden_size"], model["vision"]
    fusion = {"cross-attention": f"{model['num_fusion_layers']} co-attention layers, {model['num_heads']} heads",
              "spatial": f"{model['num_fusion_layers']} position-aware attention layers, {model['num_heads']} heads",
              "gated": "gated fusion of pooled vectors", "concat": "concatenation + MLP"}[model["fusion"]]
    pool = "" if model["fusion"] in ("cross-attention", "spatial") else f", {model['text']['pooler']}-pooled question"
    n_img = model.get("num_image_tokens") or "N"
    trained = ", ".join(strategies)
    nodes = [
        dict(key="image", x=0.0, y=0.0, kind="input",
             lines=[f"image {vision['image_size']}x{vision['image_size']} px"]),
        dict(key="question", x=4.3, y=0.0, kind="input",
             lines=[f"question (<= {model['text']['max_length']} tokens)"]),
        dict(key="vision", x=0.0, y=-1.45, kind="tower",
             lines=[f"vision tower: {_tower_name(vision['name'])}"
                    + (" (multi-scale)" if vision.get("multiscale") else ""),
                    f"{_millions(p['vision'])} params -> {n_img} x {breakdown['vision_dim']}", f"[{trained}]"]),
        dict(key="text", x=4.3, y=-1.45, kind="tower",
             lines=[f"text tower: {_tower_name(model['text']['name'])}",
                    f"{_millions(p['text'])} params -> T x {breakdown['text_dim']}", f"[{trained}]"]),
        dict(key="vproj", x=0.0, y=-2.9, kind="new",
             lines=["linear + LayerNorm", f"+ grid positions -> {n_img} x {h}"]),
        dict(key="tproj", x=4.3, y=-2.9, kind="new", lines=["linear + LayerNorm", f"-> T x {h}"]),
        dict(key="fusion", x=2.15, y=-4.2, kind="new",
             lines=[f"fusion: {model['fusion']}{pool}", f"{fusion}, width {h}", f"{_millions(p['fusion'])} params"]),
        dict(key="head", x=2.15, y=-5.5, kind="new",
             lines=[f"classifier: 2-layer MLP ({_millions(p['classifier'])} params)",
                    f"{model['loss'].upper()} loss over {len(model['id2label'])} answers"]),
    ]  # fmt: skip
    edges = [("image", "vision"), ("question", "text"), ("vision", "vproj"), ("text", "tproj"), ("vproj", "fusion"),
             ("tproj", "fusion"), ("fusion", "head")]
    return nodes, edges


TIKZ_FILL = {"input": "white", "tower": "blue!10", "new": "orange!15"}


def diagram_tikz(nodes: list[dict], edges: list[tuple[str, str]]) -> str:
    lines = [r"\begin{tikzpicture}[font=\scriptsize, box/.style={draw, rounded corners=2pt, align=center, "
             r"text width=3.75cm, inner sep=2pt}, >=stealth]"]
    for n in nodes:
        text = r"\\{} ".join(latex_escape(t) for t in n["lines"])  # {}: a line starting with [ is no \\[skip]
        width = ", text width=6.2cm" if n["key"] in ("fusion", "head") else ""
        lines.append(rf"\node[box, fill={TIKZ_FILL[n['kind']]}{width}] ({n['key']}) at ({n['x']},{n['y']}) {{{text}}};")
    lines += [rf"\draw[->] ({a}) -- ({b});" for a, b in edges]
    lines.append(r"\end{tikzpicture}")
    return "\n".join(lines) + "\n"


def diagram_png(nodes: list[dict], edges: list[tuple[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    fill = {"input": "white", "tower": "#dce6f7", "new": "#fde5cc"}
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    boxes = {}
    for n in nodes:
        w = 6.2 if n["key"] in ("fusion", "head") else 3.9
        hgt = 0.2 + 0.27 * len(n["lines"])
        boxes[n["key"]] = (n["x"], n["y"], w, hgt)
        ax.add_patch(FancyBboxPatch((n["x"] - w / 2, n["y"] - hgt / 2), w, hgt,
                                    boxstyle="round,pad=0.02,rounding_size=0.1", facecolor=fill[n["kind"]],
                                    edgecolor="black", linewidth=0.8))
        text = "\n".join(n["lines"]).replace("->", "\u2192").replace("<=", "\u2264")
        ax.text(n["x"], n["y"], text, ha="center", va="center", fontsize=7.5)
    for a, b in edges:
        (xa, ya, _, ha), (xb, yb, _, hb) = boxes[a], boxes[b]
        ax.annotate("", xy=(xb, yb + hb / 2), xytext=(xa, ya - ha / 2),
                    arrowprops=dict(arrowstyle="->", linewidth=0.8))
    xs = [x for x, _, w, _ in boxes.values() for x in (x - w / 2, x + w / 2)]
    ys = [y for _, y, _, h in boxes.values() for y in (y - h / 2, y + h / 2)]
    ax.set(xlim=(min(xs) - 0.1, max(xs) + 0.1), ylim=(min(ys) - 0.1, max(ys) + 0.1), aspect="equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# -- the paper's content -------------------------------------------------------------------------------------------


def _describe(r: dict) -> str:
    name = r["strategy"].split(" (")[0]
    if name in STRATEGY_TEXT:
        return STRATEGY_TEXT[name]
    if name.startswith("lora-r"):
        return f"LoRA as above with rank {name[len('lora-r'):]} on both towers"
    s = r["metadata"][-1]["strategies"]
    return f"a single run with the vision tower {s['vision']} and the text tower {s['text']}"


def _tower_setting(r: dict) -> str:
    s, train = r["metadata"][-1]["strategies"], r["config"]["train"]
    out = []
    for tower in ("vision", "text"):
        if s[tower] in ("lora", "qlora"):
            lora = train[f"lora_{tower}"]
            kind = "QLoRA" if s[tower] == "qlora" else "LoRA"
            where = f", last {lora['layers']} layers" if lora.get("layers") else ""  # runs before `layers`: all
            out.append(f"{tower} {kind} r={lora['rank']}, alpha={lora['alpha']}{where}")
        elif s[tower] == "partial":
            out.append(f"{tower} last {train['unfreeze_last_n']} layers")
        else:
            out.append(f"{tower} {s[tower]}")
    return "; ".join(out)


def lora_findings(rows: list[dict]) -> list[str]:
    """Each LoRA run against the full fine-tune of the same source, with the issue's targets."""
    out = []
    for full in [r for r in rows if r["strategy"].split(" (")[0] == "full"]:
        for r in rows:
            name = r["strategy"].split(" (")[0]
            if r["source"] != full["source"] or not (name == "lora" or name.startswith("lora-r")):
                continue
            ratio = r["time_to_train_s"] / max(full["time_to_train_s"], 1e-9)
            loss = full["vqa_accuracy"] - r["vqa_accuracy"]
            checks = [
                (r["trainable_percent"] <= LORA_TARGETS["max_trainable_percent"],
                 f"trains {r['trainable_percent']}% of the parameters "
                 f"(target <= {LORA_TARGETS['max_trainable_percent']}%)"),
                (ratio <= LORA_TARGETS["max_time_ratio"],
                 f"takes {ratio:.2f}x the full fine-tune's time to train "
                 f"(target <= {LORA_TARGETS['max_time_ratio']}x)"),
                (loss <= LORA_TARGETS["max_accuracy_loss"],
                 f"{'loses' if loss > 0 else 'gains'} {abs(loss):.2f} points of VQA accuracy against it "
                 f"(target: loses <= {LORA_TARGETS['max_accuracy_loss']})"),
            ]  # fmt: skip
            met = [text + (" [met]" if ok else " [not met]") for ok, text in checks]
            out.append(f"Against full fine-tuning, `{r['strategy']}` " + "; ".join(met) + ".")
    return out


def build_paper(rows: list[dict], figures: dict[str, str], tikz: str, title: str | None = None) -> Paper:
    first = rows[0]
    model, data, train = first["config"]["model"], first["config"]["data"], first["config"]["train"]
    ckpt_model = json.loads((Path(first["run_dirs"][-1]) / "checkpoint" / "config.json").read_text())
    meta, metrics = first["metadata"][-1], first["metrics"]
    names = [r["strategy"] for r in rows]
    dataset = data["dataset"]
    best = max(rows, key=lambda r: r["vqa_accuracy"])
    fastest = min(rows, key=lambda r: r["time_to_train_s"])
    title = title or f"Training strategies for a two-tower VQA model on {dataset}: {', '.join(names)}"

    abstract = (
        f"We train one visual question answering model, {_a(_tower_name(model['vision']['name']))} image encoder and a "
        f"{_tower_name(model['text']['name'])} question encoder joined by {model['fusion']} fusion, under "
        f"{len(rows)} training strategies ({', '.join(names)}) on the same data split and seed, and compare the "
        f"time to train, the trainable parameters, the peak memory, the throughput and the quality of the answers. "
        f"The best VQA accuracy ({best['vqa_accuracy']:.2f}%) is reached by {best['strategy']}; the fastest to train "
        f"is {fastest['strategy']} ({fastest['time_to_train_s']:.0f} s, {fastest['vqa_accuracy']:.2f}%)."
    )
    loss = ("binary cross-entropy against soft VQA scores" if model["loss"] == "bce"
            else "cross-entropy against the majority answer")
    arch = (
        f"Fig. @fig:arch shows the model, drawn from its configuration. The image ({model['vision']['image_size']} px) "
        f"goes "
        f"through the vision tower, whose last feature map gives {ckpt_model.get('num_image_tokens')} tokens; the "
        f"question (at most {model['text']['max_length']} word pieces) goes through the text tower. Both are "
        f"projected to width {model['hidden_size']}, the image tokens get learned grid positions, and a "
        f"{model['fusion']} fusion module ({model['num_fusion_layers']} layers, {model['num_heads']} heads) lets "
        f"each modality attend to the "
        f"other. A two-layer classifier scores the {len(ckpt_model['id2label'])} answers of the training "
        f"vocabulary, trained with {loss}."
    )  # fmt: skip
    approach = [arch, "The strategies compared:",
                Items([f"`{r['strategy']}`: {_describe(r)} ({_tower_setting(r)})." for r in rows])]

    setup = (
        f"Data: {dataset}, training split '{data['train_split']}'"
        + (f" limited to its first {data['limit']} questions" if data.get("limit") else "")
        + (f", {100 * data['train_image_fraction']:.0f}% of its images"
           if data.get("train_image_fraction", 1) < 1 else "")
        + f"; {meta['num_train_questions']} training and {meta['num_val_questions']} validation questions "
        f"(seed {data['seed']}), evaluated on {metrics['num_questions']} questions of split '{metrics['split']}'. "
        f"Each strategy trains {train['epochs']} epochs with batch size {train['batch_size']}, AdamW with learning "
        f"rates {train['lr']} (new layers), {train['tower_lr']} (tower weights) and {train['lora_lr']} (LoRA), "
        f"weight decay {train['weight_decay']}, {100 * train['warmup_ratio']:.0f}% linear warm-up then cosine decay, "
        f"precision {train['precision']}, seed {train['seed']}. Software: PyTorch {meta['torch']}, Lightning "
        f"{meta['lightning']}, Python {meta['python']}. Every strategy runs in its own process, so its peak memory "
        f"(resident set size) is its own."
    )  # fmt: skip

    cost = Table(
        "Cost of each strategy: parameters that train, time to train, throughput and peak memory.", "tab:cost",
        ["strategy", "trainable params", "% trained", "time to train (s)", "s / epoch", "examples / s",
         "peak RSS (MiB)"],
        [[r["strategy"], f"{r['trainable_parameters']:,}", f"{r['trainable_percent']}", f"{r['time_to_train_s']}",
          f"{r['seconds_per_epoch']}", f"{r['examples_per_s']}", f"{r['peak_rss_mib']}"] for r in rows], wide=True,
    )  # fmt: skip
    quality = Table(
        f"Quality on {dataset} {metrics['split']} (%): official VQA accuracy, exact-match accuracy, precision, recall "
        f"and F1 over answers (macro and weighted averages).", "tab:quality",
        ["strategy", "VQA acc.", "accuracy", "P macro", "R macro", "F1 macro", "P weighted", "R weighted",
         "F1 weighted"],
        [[r["strategy"], *(f"{r[k]:.2f}" for k in ("vqa_accuracy", "accuracy", "precision_macro", "recall_macro",
                                                   "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted"))]
         for r in rows], wide=True,
    )  # fmt: skip
    types = sorted({t for r in rows for t in r["per_answer_type"]})
    per_type = Table("VQA accuracy (%) per answer type.", "tab:types", ["strategy", *types],
                     [[r["strategy"], *(f"{r['per_answer_type'].get(t, float('nan')):.2f}" for t in types)]
                      for r in rows])

    results = [
        "Table @tab:cost lists what each strategy costs: the parameters it trains, its time to train (wall clock, "
        "from the start of fitting to its end, summed over restarts and stages), seconds per epoch, training "
        "throughput and peak memory. Table @tab:quality gives the quality of the answers on the evaluation split, and "
        "Table @tab:types and Fig. @fig:types break the VQA accuracy down by answer type. Fig. @fig:curves shows "
        "the training curves and Fig. @fig:time the trade-off between accuracy and time to train.",
        cost, quality, per_type,
    ]
    results.append(Figure(figures["curves"], "Training loss (left, log scale) and validation VQA score (right) per "
                          "step; two-stage's stage 2 continues after stage 1.", "fig:curves", wide=True))
    results.append(Figure(figures["accuracy_vs_time"], "Test VQA accuracy against time to train.", "fig:time"))
    results.append(Figure(figures["per_answer_type"], "VQA accuracy per answer type.", "fig:types"))

    discussion = [
        f"Best accuracy: {best['strategy']} ({best['vqa_accuracy']:.2f}% VQA accuracy, "
        f"{best['time_to_train_s']:.0f} s). Fastest: {fastest['strategy']} ({fastest['time_to_train_s']:.0f} s, "
        f"{fastest['vqa_accuracy']:.2f}%), {best['time_to_train_s'] / max(fastest['time_to_train_s'], 1e-9):.1f}x "
        f"faster than the best."
    ]
    discussion += lora_findings(rows)
    frozen = [r for r in rows if r["strategy"].split(" (")[0] == "frozen"]
    if frozen:
        discussion.append(
            "Frozen towers are cheapest because the towers run once per image and question, before training, and "
            "never in backward; their features come from a cache whose building time is not counted as training."
        )
    discussion.append(
        "Times are wall clock on the machine that ran the comparison, which may have been shared; rerun the "
        "command below on a quiet machine before citing them."
    )
    commands = [f"vqakit compare --config {r['source']}/base.yaml --out_dir {r['source']}"
                for r in {r["source"]: r for r in rows}.values() if (Path(r["source"]) / "base.yaml").is_file()]
    repro = ["The comparison reruns with one command per run directory (strategies as listed above):"]
    arch_figure = Figure(figures["architecture"], "The model, generated from its configuration; towers in blue, new "
                         "layers in orange; in brackets, the strategies compared.", "fig:arch", tikz=tikz)
    sections = [
        Section("Approach", [*approach, arch_figure]),
        Section("Experimental setup", [setup]),
        Section("Results", results),
        Section("Discussion", discussion),
        Section("Reproducing", [*repro, *(Code(c) for c in commands)] if commands else
                ["The runs were produced by `vqakit train`; their config.yaml files hold every setting."]),
    ]
    return Paper(title, abstract, sections, ["visual question answering", "LoRA", "fine-tuning", "efficiency"])


# -- renderers -----------------------------------------------------------------------------------------------------

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "<=": r"$\leq$", ">=": r"$\geq$", "->": r"$\rightarrow$"}  # fmt: skip
_LATEX_RE = re.compile("|".join(re.escape(k) for k in sorted(LATEX_SPECIAL, key=len, reverse=True)))


def latex_escape(text: str) -> str:
    r"""Escape TeX's special characters.

    >>> latex_escape("100% of lora_r8 & x <= 2")
    '100\\% of lora\\_r8 \\& x $\\leq$ 2'
    """
    return _LATEX_RE.sub(lambda m: LATEX_SPECIAL[m.group(0)], text)


REF = re.compile(r"@((?:tab|fig):[\w-]+)")


def numbering(paper: Paper) -> dict[str, str]:
    """Label -> number as printed: tables in Roman numerals (IEEE style), figures in Arabic."""
    labels, counts = {}, {"tab": 0, "fig": 0}
    for section in paper.sections:
        for block in section.blocks:
            if isinstance(block, (Table, Figure)):
                kind = block.label.split(":")[0]
                counts[kind] += 1
                labels[block.label] = _roman(counts[kind]) if kind == "tab" else str(counts[kind])
    return labels


def _roman(n: int) -> str:
    out = ""
    for value, letters in ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out, n = out + letters, n - value
    return out


def _latex_inline(text: str) -> str:
    """Escaped text with `code` spans as \\texttt and @tab:x / @fig:x as \\ref."""
    parts = text.split("`")
    out = "".join(rf"\texttt{{{latex_escape(p)}}}" if i % 2 else latex_escape(p) for i, p in enumerate(parts))
    return REF.sub(lambda m: rf"\ref{{{m.group(1)}}}", out)  # escaping leaves @, :, - and letters alone


def render_latex(paper: Paper) -> str:
    out = [
        r"\documentclass[conference]{IEEEtran}",
        r"\usepackage[T1]{fontenc}",
        r"\usepackage{graphicx}",
        r"\usepackage{booktabs}",
        r"\usepackage{listings}",
        r"\lstset{basicstyle=\ttfamily\scriptsize, breaklines=true, columns=fullflexible}",
        r"\IfFileExists{tikz.sty}{\usepackage{tikz}\newif\iftikz\tikztrue}{\newif\iftikz\tikzfalse}",
        r"\begin{document}",
        rf"\title{{{latex_escape(paper.title)}}}",
        r"\author{\IEEEauthorblockN{vqakit report}\IEEEauthorblockA{generated "
        + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + "}}",
        r"\maketitle",
        rf"\begin{{abstract}}{latex_escape(paper.abstract)}\end{{abstract}}",
        rf"\begin{{IEEEkeywords}}{latex_escape(', '.join(paper.keywords))}\end{{IEEEkeywords}}",
    ]
    for section in paper.sections:
        out.append(rf"\section{{{latex_escape(section.title)}}}")
        for block in section.blocks:
            if isinstance(block, str):
                out.append(_latex_inline(block) + "\n")
            elif isinstance(block, Code):
                out += [r"\begin{lstlisting}", block.text, r"\end{lstlisting}"]
            elif isinstance(block, Items):
                out += [r"\begin{itemize}", *(rf"\item {_latex_inline(i)}" for i in block.items), r"\end{itemize}"]
            elif isinstance(block, Table):
                env = "table*" if block.wide else "table"
                cols = "l" + "r" * (len(block.header) - 1)
                out += [rf"\begin{{{env}}}[!t]", r"\centering", r"\footnotesize",
                        rf"\caption{{{latex_escape(block.caption)}}}", rf"\label{{{block.label}}}",
                        rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                        " & ".join(latex_escape(h) for h in block.header) + r" \\", r"\midrule",
                        *(" & ".join(latex_escape(c) for c in row) + r" \\" for row in block.rows),
                        r"\bottomrule", r"\end{tabular}", rf"\end{{{env}}}"]
            elif isinstance(block, Figure):
                env = "figure*" if block.wide else "figure"
                width = r"\textwidth" if block.wide else r"\columnwidth"
                image = rf"\includegraphics[width={width}]{{{block.path}}}"
                body = (rf"\iftikz\resizebox{{\columnwidth}}{{!}}{{%" + "\n" + block.tikz + r"}\else " + image + r"\fi"
                        if block.tikz else image)
                out += [rf"\begin{{{env}}}[!t]", r"\centering", body,
                        rf"\caption{{{latex_escape(block.caption)}}}", rf"\label{{{block.label}}}", rf"\end{{{env}}}"]
    out.append(r"\end{document}")
    return "\n".join(out) + "\n"


def render_markdown(paper: Paper) -> str:
    numbers = numbering(paper)

    def inline(text: str) -> str:
        return REF.sub(lambda m: numbers[m.group(1)], text)

    out = [f"# {paper.title}", "", f"**Abstract.** {paper.abstract}", ""]
    for section in paper.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, str):
                out += [inline(block), ""]
            elif isinstance(block, Items):
                out += [*(f"- {inline(i)}" for i in block.items), ""]
            elif isinstance(block, Code):
                out += ["```bash", block.text, "```", ""]
            elif isinstance(block, Table):
                out += [f"*Table {numbers[block.label]}. {block.caption}*", "", "| " + " | ".join(block.header) + " |",
                        "|" + "---|" * len(block.header), *("| " + " | ".join(row) + " |" for row in block.rows), ""]
            elif isinstance(block, Figure):
                out += [f"![{block.caption}]({block.path})", "", f"*Fig. {numbers[block.label]}. {block.caption}*", ""]
    return "\n".join(out)


HTML_STYLE = """
body { font-family: Georgia, serif; max-width: 60em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { text-align: center; font-weight: normal; }
.abstract { font-size: 0.92em; margin: 1em 3em; }
table { border-collapse: collapse; margin: 0.5em auto; font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; text-align: right; } th:first-child, td:first-child { text-align: left; }
thead tr { border-top: 2px solid black; border-bottom: 1px solid black; }
tbody tr:last-child { border-bottom: 2px solid black; }
caption, figcaption { font-size: 0.88em; margin: 0.4em; }
figure { text-align: center; margin: 1.2em 0; } figure img { max-width: min(100%, 44em); }
pre { background: #f4f4f4; padding: 0.6em; white-space: pre-wrap; }
"""


def _html_inline(text: str, numbers: dict[str, str]) -> str:
    parts = text.split("`")
    out = "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))
    return REF.sub(lambda m: f'<a href="#{m.group(1)}">{numbers[m.group(1)]}</a>', out)


def render_html(paper: Paper) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(paper.title)}</title>",
           f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{html.escape(paper.title)}</h1>",
           f'<p class="abstract"><b>Abstract.</b> {html.escape(paper.abstract)}</p>']
    numbers = numbering(paper)
    for section in paper.sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, str):
                out.append(f"<p>{_html_inline(block, numbers)}</p>")
            elif isinstance(block, Items):
                out.append("<ul>" + "".join(f"<li>{_html_inline(i, numbers)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Code):
                out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
            elif isinstance(block, Table):
                out += [f'<table id="{block.label}"><caption>Table {numbers[block.label]}. '
                        f"{html.escape(block.caption)}</caption>",
                        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr></thead>",
                        "<tbody>", *("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                     for row in block.rows), "</tbody></table>"]
            elif isinstance(block, Figure):
                out.append(f'<figure id="{block.label}"><img src="{html.escape(block.path)}" '
                           f'alt="{html.escape(block.caption)}"><figcaption>Fig. {numbers[block.label]}. '
                           f"{html.escape(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# -- PDF -----------------------------------------------------------------------------------------------------------


def latex_engine() -> str | None:
    """``latexmk`` or ``pdflatex`` when installed and ``IEEEtran.cls`` is found, else None."""
    if shutil.which("pdflatex") is None:
        return None
    kpsewhich = shutil.which("kpsewhich")
    if kpsewhich:
        found = subprocess.run([kpsewhich, "IEEEtran.cls"], capture_output=True, text=True).stdout.strip()
        if not found:
            return None
    return "latexmk" if shutil.which("latexmk") else "pdflatex"


def compile_pdf(tex: Path, engine: str, timeout: int = 300) -> Path:
    """Compile ``tex`` in its folder; raises RuntimeError with the LaTeX errors when it fails."""
    if engine == "latexmk":
        runs = [["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", tex.name]]
    else:  # twice, so that figure and table references resolve
        runs = [["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name]] * 2
    for cmd in runs:
        done = subprocess.run(cmd, cwd=tex.parent, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            errors = [line for line in done.stdout.splitlines() if line.startswith("!") or line.startswith("l.")]
            raise RuntimeError(f"{' '.join(cmd)} failed in {tex.parent} (see {tex.with_suffix('.log')}): "
                               + "\n".join(errors[:10] or done.stdout.splitlines()[-10:]))
    return tex.with_suffix(".pdf")


# -- the command ---------------------------------------------------------------------------------------------------


def write_report(run_dirs: list[str], out_dir: str | Path | None = None, title: str | None = None,
                 pdf: str = "auto") -> dict[str, Path]:
    """Write report.tex/.html/.md and figures/ into ``out_dir``; compile report.pdf as ``pdf`` says
    (``auto``: when a LaTeX engine is installed, ``true``: required, ``false``: never)."""
    from vqakit.experiments.compare import plot

    if pdf not in ("auto", "true", "false"):
        raise ValueError(f"--pdf={pdf!r} is not one of ('auto', 'true', 'false')")
    rows = load_rows(list(run_dirs))
    out = Path(out_dir) if out_dir else Path(run_dirs[0]) / "report"
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot(rows, figures)
    first_ckpt = Path(rows[0]["run_dirs"][-1]) / "checkpoint"
    model = nest_tower_keys(json.loads((first_ckpt / "config.json").read_text()))
    strategies = sorted({s for r in rows for s in r["metadata"][-1]["strategies"].values()}
                        | ({"frozen"} if any(r["strategy"].startswith("two-stage") for r in rows) else set()))
    nodes, edges = diagram_nodes(model, parameter_breakdown(first_ckpt), strategies)
    diagram_png(nodes, edges, figures / "architecture.png")
    tikz = diagram_tikz(nodes, edges)
    (out / "architecture.tikz").write_text(tikz)
    names = {k: f"figures/{k}.png" for k in ("architecture", "curves", "accuracy_vs_time", "per_answer_type")}
    paper = build_paper(rows, names, tikz, title)
    written = {"tex": out / "report.tex", "html": out / "report.html", "md": out / "report.md"}
    written["tex"].write_text(render_latex(paper))
    written["html"].write_text(render_html(paper))
    written["md"].write_text(render_markdown(paper))
    engine = latex_engine() if pdf != "false" else None
    if engine:
        written["pdf"] = compile_pdf(written["tex"], engine)
    elif pdf == "true":
        raise RuntimeError("--pdf true: no LaTeX engine with IEEEtran found; install one (README, 'vqakit report': "
                           "apt-get install texlive-latex-base texlive-latex-recommended texlive-publishers "
                           "texlive-pictures)")
    return written
