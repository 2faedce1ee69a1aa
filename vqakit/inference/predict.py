"""The one inference entry point: ``VQAPredictor.from_pretrained(dir)`` then ``predict(image, questions)``.

It loads a checkpoint directory (no training code imported), preprocesses with the checkpoint's own
processor, encodes the image once for all its questions, and returns answers with probabilities,
the top-k, and optionally the question->image attention over the tower's grid (for heatmaps)::

    predictor = VQAPredictor.from_pretrained("runs/easy-vqa/checkpoint")
    predictor.predict("circle.png", "what shape is this?")[0].answer   # 'circle'
    predictor.predict_batch(["a.png", b"<png bytes>"], [["what color?", "what shape?"], "is there a circle?"])

``from_pretrained`` dispatches on ``config.json``'s ``model_type`` (``vqakit.models.registry``), so other model
families (e.g. a generative decoder) serve through the same entry point by registering their predictor.
``quantize="int8"`` serves with dynamic INT8 quantization of the Linear layers (PyTorch
``quantize_dynamic`` / ONNX Runtime ``quantize_dynamic``; accuracy and latency in benchmarks/quantize.py);
``quantize="auto"`` (the default) does so on the ONNX Runtime backend where the checkpoint's INT8 check
(``vqakit.eval.int8``, run at the end of training) found that INT8 keeps its accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqakit.data.images import DEFAULT_MAX_PIXELS, load_image
from vqakit.inference.onnx_runtime import OnnxParts
from vqakit.models.quantize import quantize_dynamic_int8
from vqakit.models.registry import MODEL_FAMILIES, model_types
from vqakit.models.two_tower import CONFIG_NAME, TwoTowerForQuestionAnswering
from vqakit.towers.processor import VQAProcessor

logger = logging.getLogger("vqakit")

@dataclass
class Prediction:
    """An answer to one question. ``attention``: (h, w) question->image attention, when asked for."""

    question: str
    answer: str
    score: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    attention: np.ndarray | None = None


BACKENDS = ("auto", "torch", "onnx")
QUANTIZATIONS = (None, "int8", "auto")


class _PredictorClasses(Mapping):
    """``model_type`` -> ``"module:Class"`` of its predictor: a read-only view of the model-family registry."""

    def __getitem__(self, model_type: str) -> str:
        return MODEL_FAMILIES[model_type].predictor

    def __iter__(self):
        return iter(MODEL_FAMILIES)

    def __len__(self) -> int:
        return len(MODEL_FAMILIES)

    def __repr__(self) -> str:
        return repr(dict(self))


# config.json ``model_type`` -> "module:Class" of its predictor (imported on first use), from
# ``vqakit.models.registry``, where families are registered. A predictor has
# ``from_pretrained(dir, device=, backend=, threads=, quantize=, question_cache=)``, VQAPredictor's ``prepare_image`` /
# ``predict_prepared`` / ``predict`` / ``predict_batch`` methods and its ``backend`` / ``labels`` attributes, which is
# all the CLI, REST service and web UI use.
PREDICTOR_CLASSES: Mapping[str, str] = _PredictorClasses()


def checkpoint_model_type(checkpoint_dir: str | Path) -> str:
    """The ``model_type`` recorded in a checkpoint's ``config.json`` (``two_tower`` for older checkpoints)."""
    from vqakit.models.checkpoint_files import read_config_json

    return read_config_json(Path(checkpoint_dir) / CONFIG_NAME).get("model_type", "two_tower")


def predictor_class(model_type: str) -> type:
    """The predictor class registered for ``model_type`` in ``vqakit.models.registry``."""
    if model_type not in MODEL_FAMILIES:
        raise NotImplementedError(
            f"no predictor for checkpoints of model_type={model_type!r}; available = {model_types()}"
        )
    return MODEL_FAMILIES[model_type].predictor_class()


def questions_per_image(pixel_values: Sequence, questions: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """``questions`` (one string or a list per image) as one list of non-empty strings per image; ``ValueError``
    naming the image when the counts differ or a question is missing or empty (every predictor's batch input)."""
    per_image = [[q] if isinstance(q, str) else list(q) for q in questions]
    if len(per_image) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} images but {len(per_image)} question lists: pass one per image")
    for i, qs in enumerate(per_image):
        if not qs:
            raise ValueError(f"no question given for image {i}")
        for q in qs:
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {q!r} for image {i} is not a non-empty string")
    return per_image


def _auto_quantize(checkpoint_dir: Path, backend: str, device: str) -> str | None:
    """``quantize="auto"``: ``"int8"`` on the CPU's ONNX Runtime backend where the checkpoint's INT8 check found
    that INT8 keeps its accuracy (``<checkpoint>/onnx/int8/accuracy.json``, of these weights), else float32."""
    if device != "cpu" or backend == "torch" or importlib.util.find_spec("onnxruntime") is None:
        return None
    from vqakit.inference.export import int8_verdict

    verdict = int8_verdict(checkpoint_dir)
    if verdict is None:
        logger.debug("serving %s in float32: no INT8 accuracy check of these weights (`vqakit export "
                    "--verify_int8`, or `--quantize int8` to serve INT8 anyway)", checkpoint_dir)
        return None
    if not verdict.get("keeps_accuracy"):
        logger.info("serving %s in float32: INT8 scored %.2f against %.2f on %d held-out questions",
                    checkpoint_dir, verdict["int8_accuracy"], verdict["float32_accuracy"], verdict["questions"])
        return None
    logger.info("serving %s in INT8: it scored %.2f against float32's %.2f on %d held-out questions",
                checkpoint_dir, verdict["int8_accuracy"], verdict["float32_accuracy"], verdict["questions"])
    return "int8"


def _auto_onnx(checkpoint_dir: Path, quantize: str | None, threads: int | None) -> "OnnxParts | None":
    """``backend="auto"`` on the CPU: ONNX Runtime over a current verified export (made now if needed), or
    ``None`` (PyTorch) with exactly one warning saying why."""
    if importlib.util.find_spec("onnxruntime") is None:
        logger.warning("serving %s with PyTorch: onnxruntime is not installed (pip install onnxruntime for the "
                       "faster ONNX Runtime backend)", checkpoint_dir)
        return None
    from vqakit.inference.export import ensure_onnx

    try:
        return OnnxParts(ensure_onnx(checkpoint_dir, quantize), threads)
    except Exception as err:  # noqa: BLE001 - any failure of the fast path leaves the (always correct) torch one
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        logger.warning("serving %s with PyTorch: no usable ONNX export (%s)", checkpoint_dir, reason)
        return None


class QuestionCache:
    """The text tower's states of the most recently asked distinct questions (LRU), so a question asked again,
    about any image, skips the text tower: most of the model's time at batch size > 1 (easy-VQA has a few
    hundred distinct questions; VQA v2's most frequent questions repeat thousands of times)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"question cache size={size} must be at least 1")
        self.size = size
        self._data: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: np.ndarray) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class VQAPredictor:
    """Answers questions about images with a two-tower classifier checkpoint (PyTorch or ONNX Runtime)."""

    def __init__(self, model: TwoTowerForQuestionAnswering, processor: VQAProcessor, device: str = "cpu",
                 onnx: OnnxParts | None = None, quantize: str | None = None, question_cache: int = 0):
        self.model = model.eval().to(device)
        self.question_cache = QuestionCache(question_cache) if question_cache else None
        self.processor = processor
        self.device = device
        self.onnx = onnx
        self.quantize = quantize
        self.id2label = model.config.id2label
        self.labels = [self.id2label[i] for i in range(len(self.id2label))]

    @property
    def backend(self) -> str:
        return "onnx" if self.onnx is not None else "torch"

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str | None = None, backend: str = "auto",
                        threads: int | None = None, quantize: str | None = "auto", question_cache: int = 0
                        ) -> "VQAPredictor":
        """Load a checkpoint directory, with the predictor its ``config.json``'s ``model_type`` asks for.

        ``backend``: ``torch``; ``onnx`` (ONNX Runtime on CPU over ``<checkpoint>/onnx/``, exported and
        verified by ``vqakit export``, at the end of training, or here on first use); ``auto`` (default) =
        ``onnx`` on the CPU, exporting and verifying on first load when ``<checkpoint>/onnx/`` is missing or was
        exported from other weights, else ``torch`` (on a GPU; and with one warning when onnxruntime is not
        installed, the directory is read-only or the export fails verification).
        ``quantize``: ``None`` (float32) or ``"int8"``: dynamic INT8 quantization of the Linear layers, CPU only
        (torch: ``torch.ao.quantization.quantize_dynamic``; onnx: ``<checkpoint>/onnx/int8/``, made on first use);
        ``"auto"`` (default): ``"int8"`` on the CPU's ONNX Runtime backend when the checkpoint's INT8 accuracy check
        (run at the end of training, or by ``vqakit export --verify_int8``) found it keeps accuracy, else float32
        (always float32 for the other model families). ``predictor.quantize`` says which was chosen.
        ``question_cache``: keep the text tower's states of this many recent distinct questions (0: none).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZATIONS}")
        model_type = checkpoint_model_type(checkpoint_dir)
        impl = predictor_class(model_type)
        if not issubclass(cls, impl):  # another model family's predictor
            return impl.from_pretrained(checkpoint_dir, device=device, backend=backend, threads=threads,
                                        quantize=None if quantize == "auto" else quantize,
                                        question_cache=question_cache)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        auto_int8 = quantize == "auto"
        if auto_int8:
            quantize = _auto_quantize(Path(checkpoint_dir), backend, device)
        if quantize and device != "cpu":
            raise ValueError(f"quantize={quantize!r} is dynamic INT8 quantization for the CPU; got device={device!r}")
        checkpoint_dir = Path(checkpoint_dir)
        model = TwoTowerForQuestionAnswering.from_pretrained(checkpoint_dir)
        processor = VQAProcessor.from_config(model.config, tokenizer_dir=checkpoint_dir / "text_tower")
        onnx = None
        if backend == "onnx":
            from vqakit.inference.export import ensure_onnx

            onnx = OnnxParts(ensure_onnx(checkpoint_dir, quantize), threads)  # errors are the caller's to see
        elif backend == "auto" and device == "cpu":
            onnx = _auto_onnx(checkpoint_dir, quantize, threads)
            if onnx is None and auto_int8:
                quantize = None  # the INT8 check was of the ONNX graphs: PyTorch serves float32
        if quantize == "int8":
            # the torch model also serves attention maps on the onnx backend: quantize it the same way
            model = quantize_dynamic_int8(model, {torch.nn.Linear})
        return cls(model, processor, device, onnx, quantize, question_cache)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """BCE-trained heads score each answer independently (sigmoid); CE heads with a softmax."""
        return torch.sigmoid(logits) if self.model.config.loss == "bce" else logits.softmax(-1)

    # -- inference ---------------------------------------------------------------------------------------------

    def prepare_image(self, image, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decode and preprocess one image (path, bytes, PIL image or numpy array) -> (3, S, S) pixel values.

        Raises ``ImageLoadError`` (a ``ValueError``) naming the problem, e.g. more than ``max_pixels`` pixels."""
        return self.processor.image(load_image(image, max_pixels=max_pixels))

    def predict(self, image, questions: str | Sequence[str], top_k: int = 5, output_attentions: bool = False
                ) -> list[Prediction]:
        """Answer one or many questions about one image (path, bytes, PIL image or numpy array); the image is
        encoded once for all of them."""
        return self.predict_batch([image], [questions], top_k, output_attentions)[0]

    def predict_batch(self, images: Sequence, questions: Sequence[str | Sequence[str]], top_k: int = 5,
                      output_attentions: bool = False) -> list[list[Prediction]]:
        """Answer questions about many images in one forward pass.

        ``questions[i]`` (one string or a list) are about ``images[i]``; returns one list of predictions per image.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists: pass one per image")
        return self.predict_prepared([self.prepare_image(im) for im in images], questions, top_k, output_attentions)

    @torch.inference_mode()
    def predict_prepared(self, pixel_values: Sequence[torch.Tensor], questions: Sequence[str | Sequence[str]],
                         top_k: int = 5, output_attentions: bool = False) -> list[list[Prediction]]:
        """``predict_batch`` over images already through ``prepare_image`` (what the REST service batches)."""
        if not pixel_values:
            return []
        per_image = questions_per_image(pixel_values, questions)
        flat = [q for qs in per_image for q in qs]
        image_index = torch.tensor([i for i, qs in enumerate(per_image) for _ in qs])  # (Q,)
        pixels = torch.stack(list(pixel_values))  # (B, 3, S, S)
        use_onnx = self.onnx is not None and not output_attentions  # attention maps come from the torch model
        if use_onnx:  # (B, N, D), once per image; on its own thread with parallel_towers, while the text runs
            tokens = self.onnx.encode_image_async(pixels.numpy())
        states, mask = self._question_states(flat, use_onnx)  # (Q, T, D), (Q, T)
        attention = None
        if use_onnx:
            tokens = tokens.result()
            logits = torch.from_numpy(self.onnx.head(tokens[image_index.numpy()], states, mask))
        else:
            image_features = self.model.backbone.encode_image(pixels.to(self.device))  # (B, N, D), once per image
            mask_t = torch.from_numpy(mask).to(self.device)
            out = self.model(image_features=image_features, image_index=image_index.to(self.device),
                             text_features=torch.from_numpy(states).to(self.device), attention_mask=mask_t,
                             output_attentions=output_attentions)
            logits = out.logits
            if output_attentions and out.attentions:
                attention = self._attention_maps(out.attentions, mask_t)
        probs = self.probabilities(logits).float().cpu()  # (Q, A)
        results, k = [], 0
        for qs in per_image:
            results.append([self._prediction(q, probs[k + j], top_k, None if attention is None else attention[k + j])
                            for j, q in enumerate(qs)])
            k += len(qs)
        return results

    def _question_states(self, questions: list[str], use_onnx: bool) -> tuple[np.ndarray, np.ndarray]:
        """The text tower's states of ``questions``, zero-padded: (Q, T, D) float32 and mask (Q, T) int64.
        Each distinct question is encoded once per call, and not at all when the question cache has it."""
        cache, backend = self.question_cache, ("onnx" if use_onnx else "torch")  # the two differ by ~1e-6
        found: dict[str, np.ndarray] = {}
        missing = []
        for q in dict.fromkeys(questions):
            hit = cache.get((backend, q)) if cache is not None else None
            if hit is None:
                missing.append(q)
            else:
                found[q] = hit
        if missing:
            text = self.processor.text(missing)
            if use_onnx:
                out = self.onnx.encode_text(text["input_ids"].numpy(), text["attention_mask"].numpy())
            else:
                enc = {k: v.to(self.device) for k, v in text.items()}
                out = self.model.backbone.encode_text(enc["input_ids"], enc["attention_mask"]).float().cpu().numpy()
            for q, q_states, n in zip(missing, out, text["attention_mask"].sum(1).tolist()):
                found[q] = q_states[:n].astype(np.float32, copy=True)  # its own tokens, without the padding
                if cache is not None:
                    cache.put((backend, q), found[q])
        T = max(len(found[q]) for q in questions)
        states = np.zeros((len(questions), T, next(iter(found.values())).shape[-1]), dtype=np.float32)
        mask = np.zeros((len(questions), T), dtype=np.int64)
        for i, q in enumerate(questions):
            states[i, : len(found[q])] = found[q]
            mask[i, : len(found[q])] = 1
        return states, mask

    def _prediction(self, question: str, probs: torch.Tensor, top_k: int, attention) -> Prediction:
        values, ids = probs.topk(max(1, min(top_k, len(self.labels))))
        ranked = [(self.labels[i], float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return Prediction(question, ranked[0][0], ranked[0][1], ranked, attention)

    def _attention_maps(self, attentions: list[torch.Tensor], mask: torch.Tensor) -> np.ndarray:
        """Question->image attention, averaged over layers and (unpadded) question tokens: (B, h, w)."""
        attn = torch.stack(attentions).mean(0)  # (B, T, N)
        m = mask.unsqueeze(-1).to(attn.dtype)
        per_image = (attn * m).sum(1) / m.sum(1)  # (B, N)
        side = int(math.isqrt(per_image.shape[1]))
        if side * side != per_image.shape[1]:
            return per_image.float().cpu().numpy()[:, None, :]
        return per_image.reshape(-1, side, side).float().cpu().numpy()

    @torch.inference_mode()
    def predict_examples(self, examples, batch_size: int = 256, use_cache: bool = True, cache_dir=None,
                         top_k: int = 5, progress: bool = True) -> list[Prediction]:
        """Answer a whole split. With ``use_cache`` the towers' outputs go through the feature cache, so a
        checkpoint whose towers were frozen in training reuses the features computed then (not for a quantized
        model, whose towers differ from the cached ones)."""
        from vqakit.data.example import require_single_image

        require_single_image(examples, "a two-tower classifier checkpoint")
        use_cache = use_cache and not self.quantize
        questions = [e.question for e in examples]
        paths = [e.image for e in examples]
        if use_cache:
            from vqakit.data.features import cache_image_features, cache_text_features

            icache, ikeys = cache_image_features(self.model, self.processor, paths, cache_dir, progress=progress)
            tcache, tkeys = cache_text_features(self.model, self.processor, questions, cache_dir, progress=progress)
        results = []
        for start in tqdm(range(0, len(examples), batch_size), desc="predicting", disable=not progress):
            end = min(start + batch_size, len(examples))
            if use_cache:
                mask = torch.from_numpy(tcache.gather(tkeys[start:end], "mask")).long()
                length = int(mask.sum(1).max())
                inputs = {
                    "image_features": torch.from_numpy(icache.gather(ikeys[start:end], "tokens")),
                    "text_features": torch.from_numpy(tcache.gather(tkeys[start:end], "states"))[:, :length],
                    "attention_mask": mask[:, :length],
                }
            else:
                inputs = {"pixel_values": self.processor.images(paths[start:end]), **self.processor.text(questions[start:end])}
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            probs = self.probabilities(self.model(**inputs).logits).float().cpu()
            results.extend(self._prediction(questions[start + i], probs[i], top_k, None) for i in range(end - start))
        return results
