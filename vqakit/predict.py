"""The one inference entry point: ``VQAPredictor.from_pretrained(dir)`` then ``predict(image, questions)``.

It loads a checkpoint directory (no training code imported), preprocesses with the checkpoint's own
processor, encodes the image once for all its questions, and returns answers with probabilities,
the top-k, and optionally the question->image attention over the tower's grid (for heatmaps)::

    predictor = VQAPredictor.from_pretrained("runs/easy-vqa/checkpoint")
    predictor.predict("circle.png", "what shape is this?")[0].answer   # 'circle'
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.processor import VQAProcessor


@dataclass
class Prediction:
    """An answer to one question. ``attention``: (h, w) question->image attention, when asked for."""

    question: str
    answer: str
    score: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    attention: np.ndarray | None = None


BACKENDS = ("auto", "torch", "onnx")


def pad_questions(states: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad question states (B, T, D) and mask (B, T) to ``length`` tokens (what ``head.onnx`` takes)."""
    B, T, D = states.shape
    if T > length:
        raise ValueError(f"{T} question tokens exceed max_question_length={length}")
    padded = np.zeros((B, length, D), dtype=states.dtype)
    padded[:, :T] = states
    full_mask = np.zeros((B, length), dtype=mask.dtype)
    full_mask[:, :T] = mask
    return padded, full_mask


class OnnxParts:
    """The checkpoint's ``onnx/`` files (``vqakit export``) run by ONNX Runtime."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None):
        import onnxruntime as ort

        def options(n_threads):
            opts = ort.SessionOptions()
            if n_threads:
                opts.intra_op_num_threads = n_threads
            # the sessions run one after another: idle pools must sleep, not spin against each other
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        # the fusion head is small (a few image tokens, <= max_question_length question tokens): one thread
        # beats waking a pool (measured with benchmarks/latency.py: p50 14.2 -> 12.1 ms on 2 cores)
        threads_of = {"vision": threads, "text": threads, "head": 1}
        self.sessions = {
            part: ort.InferenceSession(str(Path(onnx_dir) / f"{part}.onnx"), options(threads_of[part]),
                                       providers=["CPUExecutionProvider"])
            for part in ("vision", "text", "head")
        }
        self.max_question_length = json.loads((Path(onnx_dir) / "export.json").read_text())["max_question_length"]

    def logits(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One image (1, 3, S, S) and B questions -> (B, A) logits; the image is encoded once."""
        tokens = self.sessions["vision"].run(None, {"pixel_values": pixel_values})[0]
        states = self.sessions["text"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        states, mask = pad_questions(states, attention_mask, self.max_question_length)
        tokens = np.repeat(tokens, len(states), axis=0)
        feed = {"image_features": tokens, "text_features": states, "attention_mask": mask}
        return self.sessions["head"].run(None, feed)[0]


class VQAPredictor:
    def __init__(self, model: TwoTowerForQuestionAnswering, processor: VQAProcessor, device: str = "cpu",
                 onnx: OnnxParts | None = None):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.onnx = onnx
        self.id2label = model.config.id2label
        self.labels = [self.id2label[i] for i in range(len(self.id2label))]

    @property
    def backend(self) -> str:
        return "onnx" if self.onnx is not None else "torch"

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str | None = None, backend: str = "auto",
                        threads: int | None = None) -> "VQAPredictor":
        """Load a checkpoint directory.

        ``backend``: ``torch``; ``onnx`` (ONNX Runtime on CPU over ``<checkpoint>/onnx/``, exported and
        verified by ``vqakit export`` or on first use); ``auto`` = ``onnx`` when those files exist, the
        device is the CPU and onnxruntime is installed, else ``torch``.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        checkpoint_dir = Path(checkpoint_dir)
        model = TwoTowerForQuestionAnswering.from_pretrained(checkpoint_dir)
        processor = VQAProcessor.from_config(model.config, tokenizer_dir=checkpoint_dir / "text_tower")
        onnx_dir = checkpoint_dir / "onnx"
        onnx = None
        if backend == "onnx" or (backend == "auto" and device == "cpu" and (onnx_dir / "export.json").is_file()
                                 and importlib.util.find_spec("onnxruntime") is not None):
            if not (onnx_dir / "export.json").is_file():
                from vqakit.export import export_onnx

                export_onnx(checkpoint_dir)
            onnx = OnnxParts(onnx_dir, threads)
        return cls(model, processor, device, onnx)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """BCE-trained heads score each answer independently (sigmoid); CE heads with a softmax."""
        return torch.sigmoid(logits) if self.model.config.loss == "bce" else logits.softmax(-1)

    @torch.inference_mode()
    def predict(self, image, questions: str | list[str], top_k: int = 5, output_attentions: bool = False
                ) -> list[Prediction]:
        """Answer one or many questions about one image (path, bytes, PIL image or numpy array)."""
        if isinstance(questions, str):
            questions = [questions]
        if not questions:
            raise ValueError("no question given")
        if self.onnx is not None and not output_attentions:  # attention maps come from the torch model
            text = self.processor.text(questions)
            logits = self.onnx.logits(self.processor.images([image]).numpy(), text["input_ids"].numpy(),
                                      text["attention_mask"].numpy())
            probs = self.probabilities(torch.from_numpy(logits))
            return [self._prediction(q, probs[i], top_k, None) for i, q in enumerate(questions)]
        pixel_values = self.processor.images([image]).to(self.device)
        image_features = self.model.backbone.encode_image(pixel_values)  # (1, N, D), once for all questions
        text = {k: v.to(self.device) for k, v in self.processor.text(questions).items()}
        out = self.model(
            image_features=image_features.expand(len(questions), -1, -1),
            output_attentions=output_attentions,
            **text,
        )
        probs = self.probabilities(out.logits).float().cpu()
        attention = None
        if output_attentions and out.attentions:
            attention = self._attention_maps(out.attentions, text["attention_mask"])
        return [
            self._prediction(q, probs[i], top_k, None if attention is None else attention[i])
            for i, q in enumerate(questions)
        ]

    def _prediction(self, question: str, probs: torch.Tensor, top_k: int, attention) -> Prediction:
        values, ids = probs.topk(min(top_k, len(self.labels)))
        ranked = [(self.labels[i], float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return Prediction(question, ranked[0][0], ranked[0][1], ranked, attention)

    def _attention_maps(self, attentions: list[torch.Tensor], mask: torch.Tensor) -> np.ndarray:
        """Question->image attention, averaged over layers and (unpadded) question tokens: (B, h, w)."""
        attn = torch.stack(attentions).mean(0)  # (B, T, N)
        m = mask.unsqueeze(-1).to(attn.dtype)
        per_image = (attn * m).sum(1) / m.sum(1)  # (B, N)
        side = int(math.isqrt(per_image.shape[1]))
        if side * side != per_image.shape[1]:
            return per_image.cpu().numpy()[:, None, :]
        return per_image.reshape(-1, side, side).cpu().numpy()

    @torch.inference_mode()
    def predict_examples(self, examples, batch_size: int = 256, use_cache: bool = True, cache_dir=None,
                         top_k: int = 5, progress: bool = True) -> list[Prediction]:
        """Answer a whole split. With ``use_cache`` the towers' outputs go through the feature cache, so a
        checkpoint whose towers were frozen in training reuses the features computed then."""
        questions = [e.question for e in examples]
        paths = [e.image for e in examples]
        if use_cache:
            from vqakit.features import cache_image_features, cache_text_features

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
