"""Export a checkpoint's three parts to ONNX for fast CPU serving with ONNX Runtime, and verify them.

Writes ``<checkpoint>/onnx/``: ``vision.onnx`` (pixel_values -> image tokens), ``text.onnx``
(input_ids, attention_mask -> token states), ``head.onnx`` (image tokens, question states, mask ->
logits) and ``export.json`` (what was checked, with the largest difference to PyTorch).

At batch size 1 both towers are dominated by per-operator overhead in eager PyTorch (~9-15 ms each
on 2 cores); ONNX Runtime's fused kernels run them in ~3-4 ms (benchmarks/latency.py).
The head is exported for questions padded to ``max_question_length``: the legacy exporter bakes the
sequence length into ``nn.MultiheadAttention``'s reshapes, and padded tokens are masked out, so the
logits are unchanged (verified below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqakit.inference.onnx_runtime import pad_questions
from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.towers.processor import VQAProcessor

ONNX_DIR = "onnx"
OPSET = 17


class _Head(nn.Module):
    """Fusion + classifier over precomputed tower outputs."""

    def __init__(self, model: TwoTowerForQuestionAnswering):
        super().__init__()
        self.model = model

    def forward(self, image_features, text_features, attention_mask):
        return self.model(image_features=image_features, text_features=text_features,
                          attention_mask=attention_mask).logits


def _export(module, args, path, input_names, output_names, dynamic_axes):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes, checked by verification
        # grad enabled: nn.MultiheadAttention's inference fast path has no ONNX symbolic
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path | None = None, atol: float = 1e-4) -> Path:
    """Export and verify; raises ``RuntimeError`` naming the part whose ONNX output differs from PyTorch."""
    import onnxruntime as ort

    checkpoint_dir = Path(checkpoint_dir)
    out = Path(out_dir) if out_dir is not None else checkpoint_dir / ONNX_DIR
    out.mkdir(parents=True, exist_ok=True)
    model = TwoTowerForQuestionAnswering.from_pretrained(checkpoint_dir)
    processor = VQAProcessor.from_config(model.config, tokenizer_dir=checkpoint_dir / "text_tower")
    cfg, bb = model.config, model.backbone
    T = cfg.max_question_length
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    questions = ["what is the color of the shape?", "is there a circle?"]
    enc = processor.tokenizer(questions, padding="max_length", max_length=T, truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        image_tokens, states = bb.vision(pixels), bb.text(ids, mask)

    _export(bb.vision, (pixels,), out / "vision.onnx", ["pixel_values"], ["image_tokens"],
            {"pixel_values": {0: "batch"}, "image_tokens": {0: "batch"}})
    _export(bb.text, (ids, mask), out / "text.onnx", ["input_ids", "attention_mask"], ["states"],
            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
             "states": {0: "batch", 1: "tokens"}})
    _export(_Head(model).eval(), (image_tokens, states, mask), out / "head.onnx",
            ["image_features", "text_features", "attention_mask"], ["logits"],
            {"image_features": {0: "batch"}, "text_features": {0: "batch"}, "attention_mask": {0: "batch"},
             "logits": {0: "batch"}})

    # verify on inputs the export did not see: another batch size and unpadded questions for the reference
    sessions = {p: ort.InferenceSession(str(out / f"{p}.onnx"), providers=["CPUExecutionProvider"])
                for p in ("vision", "text", "head")}
    model.eval()
    pix = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    qs = ["what shape is in the image?", "is no red shape present?", "what colour?"]
    short = processor.text(qs)
    with torch.no_grad():
        ref_tokens = bb.vision(pix)
        ref_states = bb.text(short["input_ids"], short["attention_mask"])
        ref_logits = model(image_features=ref_tokens, text_features=ref_states,
                           attention_mask=short["attention_mask"]).logits
    got_tokens = sessions["vision"].run(None, {"pixel_values": pix.numpy()})[0]
    got_states = sessions["text"].run(None, {k: v.numpy() for k, v in short.items()})[0]
    states_padded, mask_padded = pad_questions(got_states, short["attention_mask"].numpy(), T)
    got_logits = sessions["head"].run(None, {"image_features": got_tokens, "text_features": states_padded,
                                             "attention_mask": mask_padded})[0]
    diffs = {
        "vision": float(np.abs(got_tokens - ref_tokens.numpy()).max()),
        "text": float(np.abs(got_states - ref_states.numpy()).max()),
        "head": float(np.abs(got_logits - ref_logits.numpy()).max()),
    }
    for part, diff in diffs.items():
        if not diff <= atol:
            raise RuntimeError(f"ONNX export of the {part} differs from PyTorch by {diff:.2e} (> {atol}); "
                               f"serve this checkpoint with backend='torch'")
    (out / "export.json").write_text(json.dumps({
        "opset": OPSET, "max_question_length": T, "max_abs_diff": diffs, "atol": atol,
        "torch": torch.__version__, "onnxruntime": ort.__version__,
    }, indent=2) + "\n")
    return out



def quantize_onnx(onnx_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dynamic INT8 quantization of the exported parts' MatMul/Gemm weights (the Linear layers), with ONNX
    Runtime's ``quantize_dynamic``: weights stored as int8, activations quantized on the fly per batch.

    Writes ``<onnx_dir>/int8/`` (default) with the three parts and an ``export.json``. Convolutions stay in
    float32: dynamic ConvInteger is slower than ONNX Runtime's float convolutions on CPU. Accuracy and
    latency against float32 are measured by ``benchmarks/quantize.py``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir = Path(onnx_dir)
    info_path = onnx_dir / "export.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: run `vqakit export` first")
    out = Path(out_dir) if out_dir is not None else onnx_dir / "int8"
    out.mkdir(parents=True, exist_ok=True)
    for part in ("vision", "text", "head"):
        quantize_dynamic(onnx_dir / f"{part}.onnx", out / f"{part}.onnx", weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    info = json.loads(info_path.read_text())
    info.update(quantization="dynamic int8 (MatMul, Gemm weights)", float_model=str(onnx_dir))
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
