"""Export a checkpoint's three parts to ONNX for fast CPU serving with ONNX Runtime, and verify them.

Writes ``<checkpoint>/onnx/``: ``vision.onnx`` (pixel_values -> image tokens), ``text.onnx``
(input_ids, attention_mask -> token states), ``head.onnx`` (image tokens, question states, mask ->
logits) and ``export.json`` (what was checked, with the largest difference to PyTorch).

At batch size 1 both towers are dominated by per-operator overhead in eager PyTorch (~9-15 ms each
on 2 cores); ONNX Runtime's fused kernels run them in ~3-4 ms (benchmarks/latency.py).
The head is exported for questions padded to ``max_question_length``: the legacy exporter bakes the
sequence length into ``nn.MultiheadAttention``'s reshapes, and padded tokens are masked out, so the
logits are unchanged (verified below).

``ensure_onnx`` is what ``VQAPredictor.from_pretrained(backend="auto")`` calls: it reuses an export whose
``export.json`` records the SHA-256 of the checkpoint's weights and config (a retrained checkpoint never serves a
stale graph), and otherwise exports and verifies again. Exports are written to a temporary sibling directory and
renamed into place, under an exclusive file lock, so two processes loading the same checkpoint at once (two server
workers) export once and never see a half-written directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqakit.inference.onnx_runtime import pad_questions
from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.towers.processor import VQAProcessor

ONNX_DIR = "onnx"
INT8_DIR = "int8"
INT8_ACCURACY = "accuracy.json"  # in the INT8 export: its accuracy against float32's (``vqakit.eval.int8``)
OPSET = 17
# what the exported graphs are a function of: the weights (full model, LoRA adapters) and the architecture
DIGEST_PATTERNS = ("config.json", "*.safetensors")


def weights_digest(checkpoint_dir: str | Path) -> str:
    """SHA-256 over the checkpoint's ``config.json`` and ``*.safetensors`` files (names and bytes)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted({f for pattern in DIGEST_PATTERNS for f in checkpoint_dir.glob(pattern) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"no config.json / *.safetensors in {checkpoint_dir}: not a checkpoint directory")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _stat_key(checkpoint_dir: Path) -> list:
    """(name, size, mtime_ns) of the digested files: when unchanged since the export, the digest is not recomputed."""
    files = sorted({f for pattern in DIGEST_PATTERNS for f in checkpoint_dir.glob(pattern) if f.is_file()})
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def export_is_current(checkpoint_dir: str | Path, onnx_dir: str | Path | None = None) -> bool:
    """Whether ``onnx_dir`` (default ``<checkpoint>/onnx``) holds a verified export of these very weights."""
    checkpoint_dir = Path(checkpoint_dir)
    info_path = Path(onnx_dir) if onnx_dir is not None else checkpoint_dir / ONNX_DIR
    info_path = info_path / "export.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if "weights_sha256" not in info:  # exported before exports were tied to the weights
        return False
    if info.get("weights_stat") == _stat_key(checkpoint_dir):
        return True
    return info["weights_sha256"] == weights_digest(checkpoint_dir)


@contextmanager
def _export_lock(target: Path):
    """An exclusive advisory lock (``fcntl.flock``) on the directory that holds ``target``: concurrent exporters of
    one checkpoint take turns (the second finds the first's export current and returns). Locking the directory
    itself leaves no lock file behind. No-op without fcntl (not POSIX)."""
    try:
        import fcntl
    except ImportError:  # the atomic rename still keeps readers from half-written files
        yield
        return
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory to ``target``, replacing an older one (renames on one file system)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
    """Export and verify into ``out_dir`` (default ``<checkpoint>/onnx``), replacing what was there atomically;
    raises ``RuntimeError`` naming the part whose ONNX output differs from PyTorch (nothing is written then)."""
    checkpoint_dir = Path(checkpoint_dir)
    out = Path(out_dir) if out_dir is not None else checkpoint_dir / ONNX_DIR
    out.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock(out):
        return _export_locked(checkpoint_dir, out, atol)


def ensure_onnx(checkpoint_dir: str | Path, quantize: str | None = None) -> Path:
    """The directory of a current, verified export of this checkpoint (``<checkpoint>/onnx``, or its ``int8/``
    for ``quantize="int8"``), exporting (and quantizing) first when it is missing or of other weights.

    Raises ``OSError`` when the checkpoint directory is not writable and has no current export, ``RuntimeError``
    when the export fails verification."""
    checkpoint_dir = Path(checkpoint_dir)
    out = checkpoint_dir / ONNX_DIR
    want = out / INT8_DIR if quantize == "int8" else out
    if export_is_current(checkpoint_dir, want):  # the common case: no lock, no write
        return want
    with _export_lock(out):  # another process may have exported while we waited: check again
        if not export_is_current(checkpoint_dir, out):
            _export_locked(checkpoint_dir, out, 1e-4)
        if quantize == "int8" and not export_is_current(checkpoint_dir, want):
            quantize_onnx(out)
    return want


def _export_locked(checkpoint_dir: Path, out: Path, atol: float) -> Path:
    import onnxruntime as ort

    digest, stat = weights_digest(checkpoint_dir), _stat_key(checkpoint_dir)
    final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _export_verified(checkpoint_dir, out, atol, ort)
        info = json.loads((out / "export.json").read_text())
        info.update(weights_sha256=digest, weights_stat=stat)
        (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        _replace_dir(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final


def _export_verified(checkpoint_dir: Path, out: Path, atol: float, ort) -> None:
    """Write the three parts and ``export.json`` into ``out`` (a fresh directory), verified against PyTorch."""
    model = TwoTowerForQuestionAnswering.from_pretrained(checkpoint_dir)
    processor = VQAProcessor.from_config(model.config, tokenizer_dir=checkpoint_dir / "text_tower")
    cfg, bb = model.config, model.backbone
    T = cfg.text.max_length
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
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
    pix = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
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


@contextmanager
def _no_root_logging_setup():
    """ONNX Runtime's quantizer warns through the root logger ("consider pre-processing"), and ``logging.warning``
    on a root logger without handlers installs one (``basicConfig``): from then on every vqakit log line printed
    twice. Root keeps a do-nothing handler meanwhile, so that advice is dropped and nothing is installed."""
    import logging

    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


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
    final = Path(out_dir) if out_dir is not None else onnx_dir / INT8_DIR
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        for part in ("vision", "text", "head"):
            with _no_root_logging_setup():
                quantize_dynamic(onnx_dir / f"{part}.onnx", out / f"{part}.onnx", weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
        info = json.loads(info_path.read_text())  # keeps the float export's weights digest: same weights
        info.update(quantization="dynamic int8 (MatMul, Gemm weights)", float_model=str(onnx_dir))
        (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        _replace_dir(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final


def int8_verdict(checkpoint_dir: str | Path) -> dict | None:
    """The accuracy check of this checkpoint's INT8 export (``<checkpoint>/onnx/int8/accuracy.json``, written by
    ``vqakit.eval.int8.verify_int8``): float32 and INT8 accuracy on held-out questions and whether INT8 keeps
    it (``keeps_accuracy``). ``None`` when there is no check, or it was made for other weights."""
    int8_dir = Path(checkpoint_dir) / ONNX_DIR / INT8_DIR
    if not export_is_current(checkpoint_dir, int8_dir):
        return None
    try:
        record = json.loads((int8_dir / INT8_ACCURACY).read_text())
        info = json.loads((int8_dir / "export.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("weights_sha256") == info.get("weights_sha256") else None


def write_int8_verdict(checkpoint_dir: str | Path, record: dict) -> Path:
    """Record an accuracy check of the (current) INT8 export, tied to the weights it was made from."""
    int8_dir = Path(checkpoint_dir) / ONNX_DIR / INT8_DIR
    info = json.loads((int8_dir / "export.json").read_text())
    path = int8_dir / INT8_ACCURACY
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "weights_sha256": info["weights_sha256"]}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
