"""ONNX Runtime for a two-tower checkpoint's exported parts (``vqakit export`` writes them; :mod:`vqakit.inference.export`).

Three sessions, one per part: ``vision.onnx`` (pixel_values -> image tokens), ``text.onnx`` (input_ids,
attention_mask -> token states) and ``head.onnx`` (image tokens, question states padded to
``max_question_length``, mask -> logits). ONNX Runtime: https://onnxruntime.ai/docs/api/python/api_summary.html
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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
    """The checkpoint's ``onnx/`` files (``vqakit export``) run by ONNX Runtime.

    ``parallel_towers`` (default): ``logits`` / ``VQAPredictor.predict_prepared`` run the vision tower on a second
    thread while the text tower runs on the caller's (ONNX Runtime releases the GIL), each session with ``threads``
    intra-op threads (default 1: one core per tower, no thread pool to wake). ``False``: one after the other, each
    session with ``threads`` (default: ONNX Runtime's, one per core). Parallel towers with one thread each were
    as fast or faster at every batch size measured, and 1.2-1.8x faster with INT8 (docs/performance.md)."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None, head_threads: int = 1,
                 parallel_towers: bool = True):
        import onnxruntime as ort

        self.parallel_towers = parallel_towers
        if parallel_towers:
            from concurrent.futures import ThreadPoolExecutor

            threads = threads or 1
            self._vision_thread = ThreadPoolExecutor(1, thread_name_prefix="vqakit-vision")

        def options(n_threads):
            opts = ort.SessionOptions()
            if n_threads:
                opts.intra_op_num_threads = n_threads
            # the sessions run one after another: idle pools must sleep, not spin against each other
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        # the fusion head is small (a few image tokens, <= max_question_length question tokens): one thread
        # beats waking a pool (measured with benchmarks/latency.py: p50 14.2 -> 12.1 ms on 2 cores)
        threads_of = {"vision": threads, "text": threads, "head": head_threads}
        self.sessions = {
            part: ort.InferenceSession(str(Path(onnx_dir) / f"{part}.onnx"), options(threads_of[part]),
                                       providers=["CPUExecutionProvider"])
            for part in ("vision", "text", "head")
        }
        self.max_question_length = json.loads((Path(onnx_dir) / "export.json").read_text())["max_question_length"]

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> image tokens (B, N, D)."""
        return self.sessions["vision"].run(None, {"pixel_values": pixel_values})[0]

    def encode_image_async(self, pixel_values: np.ndarray):
        """``encode_image`` started now; ``.result()`` gives the tokens (on the vision thread with
        ``parallel_towers``, else computed right here)."""
        from concurrent.futures import Future

        if self.parallel_towers:
            return self._vision_thread.submit(self.encode_image, pixel_values)
        done: Future = Future()
        done.set_result(self.encode_image(pixel_values))
        return done

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(Q, T) token ids and mask -> question token states (Q, T, D)."""
        return self.sessions["text"].run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def head(self, image_tokens: np.ndarray, states: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Image tokens (Q, N, D), question states (Q, T, D) and mask (Q, T) -> logits (Q, A)."""
        states, mask = pad_questions(states, mask, self.max_question_length)
        feed = {"image_features": image_tokens, "text_features": states, "attention_mask": mask}
        return self.sessions["head"].run(None, feed)[0]

    def logits(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
               image_index: np.ndarray | None = None) -> np.ndarray:
        """Images (B, 3, S, S) and Q questions -> (Q, A) logits; each image is encoded once.

        ``image_index`` (Q,): which image each question is about (default: all about image 0)."""
        tokens = self.encode_image_async(pixel_values)  # (B, N, D), concurrently with the text tower
        states = self.encode_text(input_ids, attention_mask)
        tokens = tokens.result()
        if image_index is None:
            image_index = np.zeros(len(states), dtype=np.int64)
        return self.head(tokens[image_index], states, attention_mask)
