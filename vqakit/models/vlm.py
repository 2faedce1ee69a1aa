"""Pretrained vision-language models fine-tuned for VQA with LoRA: BLIP (generative) and ViLT (classifier).

References:
- Li et al., 2022, "BLIP: Bootstrapping Language-Image Pre-training" (https://arxiv.org/abs/2201.12086):
  ``BlipForQuestionAnswering`` encodes image + question and *generates* the answer with its text decoder.
- Kim et al., 2021, "ViLT: Vision-and-Language Transformer Without Convolution or Region Supervision"
  (https://arxiv.org/abs/2102.03334): ``ViltForQuestionAnswering`` scores a fixed answer list; its loss is
  BCE on VQA soft scores times the number of answers (as ban-vqa, https://github.com/jnhwkim/ban-vqa).
- Hu et al., 2021, LoRA (https://arxiv.org/abs/2106.09685) through PEFT; the adapted modules are configurable.

Weights are loaded by hub id or local directory (``save_pretrained`` of the model and of its processor). Nothing
can be downloaded on this project's machines, so the tests use tiny random configs saved locally; with real
weights (``Salesforce/blip-vqa-base``, ``dandelin/vilt-b32-finetuned-vqa``) the same code path runs.

Checkpoint directory: ``config.json`` (``model_type: vlm``, the settings below), ``vlm/`` (the fine-tuned HF
model with LoRA merged: its own ``config.json`` + ``model.safetensors``, and the processor files) and
``adapters/vlm/`` (the LoRA adapter in PEFT format, when LoRA ran).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from vqakit.models.checkpoint import CONFIG_NAME, ConfigMixin
from vqakit.models.checkpoint_files import load_weights
from vqakit.data.answers import normalize_answer
from vqakit.data.images import load_image

Architecture = Literal["auto", "blip", "vilt"]
ARCHITECTURES = get_args(Architecture)
DEFAULT_LORA_TARGETS = {"blip": ["query", "value"], "vilt": ["query", "value"]}


@dataclass
class VLMConfig(ConfigMixin):
    """A pretrained VLM for VQA (saved as ``config.json`` with ``model_type: vlm``).

    Args:
        model: HF model id or local directory of a BLIP-VQA or ViLT-VQA model (with its processor files).
        architecture: ``blip``, ``vilt``, or ``auto`` (read from the model's ``config.json``).
        image_size: images are resized to this square size (0: the processor's own size).
        max_question_length: questions are truncated to this many tokens.
        max_answer_length: most answer tokens BLIP generates.
        num_beams: beams of BLIP's generation (1: greedy).
        lora_target_modules: module names that get LoRA adapters (empty: the attention query/value projections).
        id2label: ViLT's answer list (filled from the training data when fine-tuning).
    """

    model: str = "Salesforce/blip-vqa-base"
    architecture: Architecture = "auto"
    image_size: int = 0
    max_question_length: int = 32
    max_answer_length: int = 8
    num_beams: int = 1
    lora_target_modules: list[str] = field(default_factory=list)
    id2label: dict[int, str] = field(default_factory=dict)

    model_type = "vlm"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"--vlm.architecture={self.architecture!r} is not one of {ARCHITECTURES}")
        if self.num_beams < 1:
            raise ValueError(f"--vlm.num_beams={self.num_beams} must be at least 1")
        self.id2label = {int(k): v for k, v in self.id2label.items()}


def detect_architecture(model: str) -> str:
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except OSError as err:
        raise ValueError(f"--vlm.model={model!r} is not a loadable Hugging Face model id or directory "
                         f"(no network here? pass a local directory): {err}") from err
    if model_type not in ("blip", "vilt"):
        raise ValueError(f"--vlm.model={model!r} is a {model_type!r} model; supported: blip, vilt")
    return model_type


class VLMProcessor:
    """The model's own HF processor behind vqakit's processor interface (``image``, ``images``, ``text``)."""

    def __init__(self, hf_processor, image_size: int, max_question_length: int):
        self.hf = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.image_size = image_size
        self.max_question_length = max_question_length

    def image(self, source) -> torch.Tensor:
        img = load_image(source)
        if self.image_size and img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size))
        kwargs = {"do_resize": False} if self.image_size else {}
        return self.hf.image_processor(img, return_tensors="pt", **kwargs)["pixel_values"][0]

    def images(self, sources) -> torch.Tensor:
        return torch.stack([self.image(s) for s in sources])

    def text(self, questions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(questions), padding=True, truncation=True, max_length=self.max_question_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, save_dir) -> None:
        self.hf.save_pretrained(save_dir)


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None = None
    answer_exact: torch.Tensor | None = None


class VLMForQuestionAnswering(nn.Module):
    """One interface over BLIP (generates) and ViLT (classifies): ``forward(..., answers)`` -> loss,
    ``generate(...)`` -> ``[(answer, score)]``."""

    def __init__(self, config: VLMConfig, model: nn.Module, hf_processor):
        super().__init__()
        self.config = config
        self.model = model
        self.arch = config.architecture
        size = config.image_size or _processor_size(hf_processor)
        self.processor = VLMProcessor(hf_processor, size, config.max_question_length)

    @classmethod
    def build(cls, config: VLMConfig, id2label: dict[int, str] | None = None) -> "VLMForQuestionAnswering":
        """Load by id or directory. ViLT: a new ``id2label`` re-initialises the classifier for that answer list."""
        from transformers import AutoProcessor, BlipForQuestionAnswering, ViltForQuestionAnswering

        if config.architecture == "auto":
            config.architecture = detect_architecture(config.model)
        try:
            processor = AutoProcessor.from_pretrained(config.model)
            if config.architecture == "blip":
                model = BlipForQuestionAnswering.from_pretrained(config.model)
            else:
                kwargs = {}
                if id2label:
                    kwargs = dict(id2label={int(k): v for k, v in id2label.items()},
                                  label2id={v: int(k) for k, v in id2label.items()}, ignore_mismatched_sizes=True)
                model = ViltForQuestionAnswering.from_pretrained(config.model, **kwargs)
                config.id2label = {int(k): v for k, v in model.config.id2label.items()}
        except OSError as err:
            raise ValueError(f"--vlm.model={config.model!r} could not be loaded with its processor: {err}") from err
        return cls(config, model, processor)

    def pretrained_modules(self) -> list[nn.Module]:
        if self.arch == "vilt":  # the answer classifier is new when fine-tuning on another answer list
            return [m for n, m in self.model.named_children() if n != "classifier"]
        return [self.model]

    def default_lora_targets(self) -> list[str]:
        return self.config.lora_target_modules or DEFAULT_LORA_TARGETS[self.arch]

    def forward(self, pixel_values, input_ids, attention_mask, answers: list[str], **unused) -> VLMOutput:
        if self.arch == "vilt":
            label2id = {normalize_answer(v): k for k, v in self.config.id2label.items()}
            logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
            labels = torch.tensor([label2id.get(normalize_answer(a), -1) for a in answers], device=logits.device)
            targets = torch.zeros_like(logits)
            known = labels >= 0
            targets[known.nonzero().squeeze(1), labels[known]] = 1.0
            loss = F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[1]
            return VLMOutput(loss=loss, logits=logits, answer_exact=(logits.argmax(-1) == labels))
        tok = self.processor.tokenizer
        enc = tok([a.strip() for a in answers], padding=True, truncation=True, max_length=self.config.max_answer_length,
                  return_tensors="pt").to(input_ids.device)
        decoder_ids = enc["input_ids"].clone()
        decoder_ids[:, 0] = self.model.decoder_start_token_id  # [CLS] -> the decoder's start token, as BLIP does
        labels = decoder_ids.masked_fill(enc["attention_mask"] == 0, -100)
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_ids, decoder_attention_mask=enc["attention_mask"], labels=labels)
        return VLMOutput(loss=out.loss)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask, **unused) -> list[tuple[str, float]]:
        if self.arch == "vilt":
            logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
            probs = logits.float().sigmoid()
            score, idx = probs.max(-1)
            return [(self.config.id2label[int(i)], float(s)) for s, i in zip(score, idx)]
        out = self.model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                  max_new_tokens=self.config.max_answer_length, num_beams=self.config.num_beams,
                                  output_scores=True, return_dict_in_generate=True)
        seqs = out.sequences
        scores = self.model.text_decoder.compute_transition_scores(seqs, out.scores, getattr(out, "beam_indices", None),
                                                                   normalize_logits=True) \
            if hasattr(self.model.text_decoder, "compute_transition_scores") else None
        texts = self.processor.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        probs = [1.0] * len(texts) if scores is None else scores.nan_to_num(0.0).sum(-1).exp().tolist()
        return [(t.strip(), float(p)) for t, p in zip(texts, probs)]

    # -- serving helpers (vqakit.inference.generative.GenerativePredictor) -----------------------------------------------------

    def decoding_settings(self) -> dict:
        c = self.config
        return {"architecture": self.arch, "max_answer_length": c.max_answer_length, "num_beams": c.num_beams}

    def answer_image(self, processor, image, questions: list[str], device="cpu", **unused):
        return self.answer_images(processor, processor.images([image]), [questions], device)[0]

    def answer_images(self, processor, pixel_values: torch.Tensor, questions: list[list[str]], device="cpu",
                      **unused) -> list[list[tuple[str, float]]]:
        """Images (B, 3, S, S) with ``questions[i]`` about image i, answered in one batch."""
        index = torch.tensor([i for i, qs in enumerate(questions) for _ in qs])
        text = {k: v.to(device) for k, v in processor.text([q for qs in questions for q in qs]).items()}
        flat = self.generate(pixel_values=pixel_values[index].to(device), **text)
        out, k = [], 0
        for qs in questions:
            out.append(flat[k : k + len(qs)])
            k += len(qs)
        return out

    def batch_inputs(self, processor, examples, use_cache: bool = True, cache_dir=None, progress: bool = True):
        questions, paths = [e.question for e in examples], [e.image for e in examples]
        return lambda s, e: {"pixel_values": processor.images(paths[s:e]), **processor.text(questions[s:e])}

    # -- checkpoint directory --------------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """LoRA adapter to ``adapters/vlm/``, then merged; the HF model + processor to ``vlm/``; ``config.json``."""
        from peft import PeftModel

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, PeftModel):
            self.model.save_pretrained(save_dir / "adapters" / "vlm")
            self.model = self.model.merge_and_unload()
        self.model.save_pretrained(save_dir / "vlm")
        self.processor.save_pretrained(save_dir / "vlm")
        self.config.save_json(save_dir)
        return save_dir

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "VLMForQuestionAnswering":
        checkpoint_dir = Path(checkpoint_dir)
        config = VLMConfig.from_json(checkpoint_dir)
        if not (checkpoint_dir / "vlm" / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{checkpoint_dir / 'vlm'} has no fine-tuned model (config.json)")
        saved = VLMConfig(**{**asdict(config), "model": str(checkpoint_dir / "vlm")})
        model = cls.build(saved)
        model.config = config
        return model.eval()


def _processor_size(hf_processor) -> int:
    size = getattr(hf_processor.image_processor, "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or 384)
