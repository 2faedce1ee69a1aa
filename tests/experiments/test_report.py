"""vqakit report: an IEEE paper (LaTeX, PDF when a TeX engine is installed), HTML and markdown from a tiny
compare run (no real training: the tiny random-config towers of conftest.py)."""

from __future__ import annotations

import json

import pytest

from vqakit.cli import main
from vqakit.experiments.report import latex_engine, lora_findings, write_report


@pytest.fixture(scope="module")
def compare_dir(tiny_vision_tower, tiny_text_tower, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "cmp"
    model = ["--model.vision.name", tiny_vision_tower, "--model.text.name", tiny_text_tower,
             "--model.vision.image_size", "32", "--model.hidden_size", "32", "--model.num_heads", "4",
             "--model.num_fusion_layers", "1"]  # fmt: skip
    main(["compare", *model, "--data.limit", "24", "--data.cache_dir", str(tmp / "cache"), "--train.epochs", "1",
          "--train.batch_size", "8", "--strategies", "frozen,full", "--out_dir", str(out)])
    return out


def test_report_html_markdown_latex(compare_dir, tmp_path, capsys):
    out = tmp_path / "report"
    main(["report", str(compare_dir), "--out_dir", str(out), "--pdf", "false"])  # the run dir is positional
    assert "md: " in capsys.readouterr().out
    rows = json.loads((compare_dir / "comparison.json").read_text())
    md, page, tex = ((out / f"report.{ext}").read_text() for ext in ("md", "html", "tex"))
    for r in rows:  # every strategy's numbers are in every version
        for text in (md, page, tex):
            assert f"{r['trainable_parameters']:,}" in text and f"{r['vqa_accuracy']:.2f}" in text
    assert r"\documentclass[conference]{IEEEtran}" in tex and tex.count(r"\begin{table*}") == 2
    assert r"\begin{tikzpicture}" in tex and r"\ref{tab:cost}" in tex and "@tab:" not in tex
    assert "Table I." in md and "Table II." in md and "Fig. 2." in md and "@fig:" not in md
    assert page.count("<table") == 3 and page.count("<figure") == 4 and "Table <a href=\"#tab:cost\">I</a>" in page
    # the diagram is drawn from the config: the tiny towers' names and widths (32), the fusion's settings
    tikz = (out / "architecture.tikz").read_text()
    assert "tiny-vit" in tikz and "tiny-bert" in tikz and "1 co-attention layers, 4 heads, width 32" in tikz
    for name in ("architecture", "curves", "accuracy_vs_time", "per_answer_type"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"figures/{name}.png" in md and f"figures/{name}.png" in page
    assert not (out / "report.pdf").exists()


def test_report_of_several_run_dirs_names_them_apart(compare_dir, tmp_path):
    # the compare directory plus one of its strategies as a single train run: "frozen" twice
    written = write_report([str(compare_dir), str(compare_dir / "frozen")], tmp_path / "r", pdf="false")
    md = written["md"].read_text()
    assert "| frozen (cmp) |" in md and "| frozen (frozen) |" in md


def test_lora_findings_check_the_issue_targets():
    def row(name, percent, seconds, accuracy):
        return {"strategy": name, "source": "runs/cmp", "trainable_percent": percent, "time_to_train_s": seconds,
                "vqa_accuracy": accuracy}

    full = row("full", 100.0, 100.0, 90.0)
    good = lora_findings([full, row("lora", 1.5, 60.0, 89.5)])
    bad = lora_findings([full, row("lora-r16", 4.9, 83.0, 88.0)])
    assert len(good) == 1 and good[0].count("[met]") == 3 and "0.60x" in good[0] and "loses 0.50 points" in good[0]
    assert bad[0].count("[not met]") == 3 and "4.9%" in bad[0] and "0.83x" in bad[0]
    assert lora_findings([row("lora", 1.0, 1.0, 1.0)]) == []  # no full fine-tune to compare with
    assert lora_findings([full, {**row("lora", 1.0, 1.0, 1.0), "source": "runs/other"}]) == []  # not the same run


def test_report_errors(compare_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        write_report([str(tmp_path / "missing")], tmp_path / "r", pdf="false")
    with pytest.raises(ValueError, match="neither a `vqakit compare` directory"):
        write_report([str(tmp_path)], tmp_path / "r", pdf="false")
    with pytest.raises(ValueError, match="--pdf"):
        write_report([str(compare_dir)], tmp_path / "r", pdf="maybe")
    import vqakit.experiments.report

    monkeypatch.setattr(vqakit.experiments.report, "latex_engine", lambda: None)
    with pytest.raises(RuntimeError, match="no LaTeX engine"):
        write_report([str(compare_dir)], tmp_path / "r", pdf="true")


@pytest.mark.skipif(latex_engine() is None, reason="no pdflatex with IEEEtran.cls: install the TeX packages "
                    "listed in the README ('vqakit report') to test PDF compilation")
def test_report_compiles_to_pdf(compare_dir, tmp_path):
    written = write_report([str(compare_dir)], tmp_path / "r", pdf="true")
    assert written["pdf"].read_bytes()[:5] == b"%PDF-" and written["pdf"].stat().st_size > 20_000
    log = written["tex"].with_suffix(".log").read_text(errors="replace")
    assert "undefined references" not in log and "Overfull" not in log
    assert "tikz" in log  # the diagram was drawn by TikZ, not the PNG fallback
