"""Inference for generative checkpoints (GRU decoder, vision-prefixed LLM, pretrained VLM): free-text answers.

``load_predictor(dir)`` reads ``config.json``'s ``model_type`` and returns the right predictor: the
classifier's :class:`~vqakit.inference.predict.VQAPredictor` or a :class:`GenerativePredictor`. Both answer
``predict(image, questions)`` and ``predict_examples(examples)`` with :class:`~vqakit.inference.predict.Prediction`
records, so the CLI and the evaluator do not care which family a checkpoint is. No training code is
imported here.

    predictor = load_predictor("runs/easy-vqa-gru/checkpoint")
    predictor.predict("shape.png", ["what color is the shape?"])[0].answer   # 'red'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vqakit.data.images import DEFAULT_MAX_PIXELS, load_image
from vqakit.inference.predict import Prediction, VQAPredictor, checkpoint_model_type, questions_per_image
from vqakit.models.registry import generative_types, model_family
from vqakit.towers.processor import VQAProcessor

GENERATIVE_TYPES = generative_types()  # the registered families that generate their answers


def load_predictor(checkpoint_dir: str | Path, device: str | None = None, backend: str = "auto", **kwargs):
    """The predictor for any vqakit checkpoint directory (``VQAPredictor.from_pretrained`` dispatches on
    ``model_type`` through the registry, ``vqakit.models.registry``)."""
    return VQAPredictor.from_pretrained(checkpoint_dir, device=device, backend=backend, **kwargs)


class GenerativePredictor:
    """Answers with generated text. ``Prediction.score`` is the probability of the generated word sequence;
    ``top_k`` holds that one answer (generation gives one answer per question)."""

    generative = True
    backend = "torch"
    multi_image = False  # examples with several images (ChatVLMPredictor)

    def __init__(self, model, processor, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.labels = None  # free text: no fixed answer classes

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str | None = None, backend: str = "auto",
                        threads: int | None = None, quantize: str | None = None, question_cache: int = 0,
                        **kwargs) -> "GenerativePredictor":
        """``backend``/``question_cache`` are the classifier's serving options: generative checkpoints run in
        PyTorch and say so when asked for anything else. ``quantize="int8"`` (CPU, LLM-prefix checkpoints):
        dynamic INT8 quantization of most of the LM's Linear layers (``LLMPrefixForQuestionAnswering.quantize_int8``),
        which cuts the weight memory each LM pass reads; agreement with float32 and latency in
        benchmarks/llm_latency.py."""
        checkpoint_dir = Path(checkpoint_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kind = checkpoint_model_type(checkpoint_dir)
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend={backend!r}: {kind} checkpoints are served with PyTorch (backend='torch')")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize={quantize!r} is not one of (None, 'int8')")
        if quantize and kind != "llm_prefix":
            raise ValueError(f"quantize={quantize!r}: INT8 serving is for classifier and llm_prefix checkpoints, "
                             f"not {kind}")
        if quantize and device != "cpu":
            raise ValueError(f"quantize={quantize!r} is dynamic INT8 quantization for the CPU; got device={device!r}")
        if threads:
            torch.set_num_threads(threads)
        if kind not in GENERATIVE_TYPES:
            raise ValueError(f"{checkpoint_dir}/config.json: model_type={kind!r} is not one of {GENERATIVE_TYPES}")
        family = model_family(kind)
        if family.predictor_class() is not cls:  # a family with its own predictor (ChatVLMPredictor)
            return family.predictor_class().from_pretrained(checkpoint_dir, device=device, backend=backend,
                                                            threads=threads, quantize=quantize, **kwargs)
        model_class = family.model_class()
        if kind == "llm_prefix":
            model = model_class.from_pretrained(checkpoint_dir, device=device, **kwargs)
            model.eval()
            if quantize == "int8":
                model.quantize_int8()  # caches the prompt prefix's keys/values from the float32 LM first
            else:
                model.cache_prompt_prefix()
            return cls(model, model.processor, device)
        model = model_class.from_pretrained(checkpoint_dir)
        if kind == "gru_decoder":  # the two-tower encoder's processor
            return cls(model, VQAProcessor.from_config(model.config, tokenizer_dir=checkpoint_dir / "text_tower"),
                       device)
        return cls(model, model.processor, device)

    @property
    def decoding(self) -> dict:
        """The decoding settings the checkpoint generates with (written into metrics.json)."""
        return self.model.decoding_settings()

    @torch.inference_mode()
    def predict(self, image, questions: str | list[str], top_k: int = 1, **generate_kwargs) -> list[Prediction]:
        """Answer one or many questions about one image (path, bytes, PIL image or numpy array); the image
        is encoded once (the LLM family also reuses its key/value cache across the questions)."""
        if isinstance(questions, str):
            questions = [questions]
        if not questions:
            raise ValueError("no question given")
        answers = self.model.answer_image(self.processor, image, questions, device=self.device, **generate_kwargs)
        return [Prediction(q, a, s, [(a, s)]) for q, (a, s) in zip(questions, answers)]

    def prepare_image(self, image, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decode and preprocess one image (path, bytes, PIL image or numpy array) -> (3, S, S) pixel values,
        as ``VQAPredictor.prepare_image`` (what the REST service does before batching).

        Raises ``ImageLoadError`` (a ``ValueError``) naming the problem, e.g. more than ``max_pixels`` pixels."""
        return self.processor.image(load_image(image, max_pixels=max_pixels))

    # the same batch API as the classifier's: prepare each image, then predict_prepared
    predict_batch = VQAPredictor.predict_batch

    @torch.inference_mode()
    def predict_prepared(self, pixel_values: Sequence[torch.Tensor], questions: Sequence[str | Sequence[str]],
                         top_k: int = 1, output_attentions: bool = False) -> list[list[Prediction]]:
        """``predict_batch`` over images already through ``prepare_image`` (what the REST service batches): one
        list of predictions per image, each image encoded once (the LLM family also computes its key/value cache
        once per image). ``top_k`` holds the one generated answer whatever ``top_k`` is; there are no attention
        heatmaps (``output_attentions`` raises ``ValueError``)."""
        if output_attentions:
            raise ValueError("heatmap: attention heatmaps come from classifier checkpoints; a generative "
                             "checkpoint has none")
        if not pixel_values:
            return []
        per_image = questions_per_image(pixel_values, questions)
        answers = self.model.answer_images(self.processor, torch.stack(list(pixel_values)), per_image,
                                           device=self.device)
        return [[Prediction(q, a, s, [(a, s)]) for q, (a, s) in zip(qs, image_answers)]
                for qs, image_answers in zip(per_image, answers)]

    @torch.inference_mode()
    def predict_examples(self, examples, batch_size: int = 64, use_cache: bool = True, cache_dir=None,
                         top_k: int = 1, progress: bool = True) -> list[Prediction]:
        """Answer a whole split, batched; frozen towers' outputs come through the feature cache."""
        if not self.multi_image:
            from vqakit.data.example import require_single_image

            require_single_image(examples, f"a {checkpoint_kind(self.model)} checkpoint")
        inputs_of = self.model.batch_inputs(self.processor, examples, use_cache=use_cache, cache_dir=cache_dir,
                                            progress=progress)
        results = []
        for start in tqdm(range(0, len(examples), batch_size), desc="generating", disable=not progress):
            end = min(start + batch_size, len(examples))
            inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs_of(start, end).items()}
            for e, (a, s) in zip(examples[start:end], self.model.generate(**inputs)):
                results.append(Prediction(e.question, a, s, [(a, s)]))
        return results


def checkpoint_kind(model) -> str:
    return type(model).__name__.removesuffix("ForQuestionAnswering")


class ChatVLMPredictor(GenerativePredictor):
    """A chat-VLM checkpoint (:mod:`vqakit.models.chat_vlm`): ``prepare_image`` gives the resized PIL image (the
    processor makes a variable number of image tokens per image), and ``predict`` also takes a list of images
    for one question set where the architecture supports several images."""

    multi_image = True

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str | None = None, backend: str = "auto",
                        threads: int | None = None, quantize: str | None = None, question_cache: int = 0,
                        **kwargs) -> "ChatVLMPredictor":
        from vqakit.models.chat_vlm import ChatVLMForQuestionAnswering

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend={backend!r}: chat_vlm checkpoints are served with PyTorch (backend='torch')")
        if quantize is not None:
            raise ValueError(f"quantize={quantize!r}: INT8 serving is for classifier and llm_prefix checkpoints, "
                             f"not chat_vlm")
        if threads:
            torch.set_num_threads(threads)
        model = ChatVLMForQuestionAnswering.from_pretrained(checkpoint_dir, device=device, **kwargs)
        return cls(model, model.processor, device)

    def prepare_image(self, image, max_pixels: int = DEFAULT_MAX_PIXELS):
        """Decode one image (path, bytes, PIL or numpy) -> the PIL image resized within the checkpoint's
        ``max_pixels``. Raises ``ImageLoadError`` (a ``ValueError``), e.g. more than ``max_pixels`` pixels."""
        return self.processor.image(load_image(image, max_pixels=max_pixels))

    @torch.inference_mode()
    def predict_prepared(self, pixel_values: Sequence, questions: Sequence[str | Sequence[str]],
                         top_k: int = 1, output_attentions: bool = False) -> list[list[Prediction]]:
        """``predict_batch`` over images already through ``prepare_image``; one left-padded generation batch."""
        if output_attentions:
            raise ValueError("heatmap: attention heatmaps come from classifier checkpoints; a generative "
                             "checkpoint has none")
        if not pixel_values:
            return []
        per_image = questions_per_image(pixel_values, questions)
        answers = self.model.answer_images(self.processor, list(pixel_values), per_image, device=self.device)
        return [[Prediction(q, a, s, [(a, s)]) for q, (a, s) in zip(qs, image_answers)]
                for qs, image_answers in zip(per_image, answers)]
