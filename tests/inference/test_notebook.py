"""notebooks/inference.ipynb runs top to bottom on a tiny checkpoint (nbclient, a real kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.towers.text import load_tokenizer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "inference.ipynb"


def test_inference_notebook_executes(tiny_config, tiny_text_tower, tmp_path):
    torch.manual_seed(0)
    labels = ["yes", "no", "red", "blue", "circle", "triangle"]
    model = TwoTowerForQuestionAnswering(tiny_config(id2label=dict(enumerate(labels))))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=load_tokenizer(tiny_text_tower))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f'\nCHECKPOINT = "{tmp_path / "ckpt"}"\nLIMIT = 30\nNUM_EXAMPLES = 2'
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "VQA accuracy (official)" in outputs
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the examples and the attention map
