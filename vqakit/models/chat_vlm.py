"""Small instruction-tuned VLMs fine-tuned for VQA through ``AutoModelForImageTextToText`` and a chat template.

Supported architectures (Hugging Face ``model_type``): ``idefics3`` / ``smolvlm`` (SmolVLM, SmolVLM2), ``qwen2_vl`` /
``qwen2_5_vl`` (Qwen2-VL, Qwen2.5-VL), ``paligemma`` (PaliGemma 1/2), ``llava`` / ``llava_next``.

References:
- Marafioti et al., 2025, "SmolVLM: Redefining small and efficient multimodal models" (https://arxiv.org/abs/2504.05299);
  Laurençon et al., 2024, Idefics3 (https://arxiv.org/abs/2408.12637).
- Wang et al., 2024, "Qwen2-VL" (https://arxiv.org/abs/2409.12191): images of any size within a pixel budget.
- Beyer et al., 2024, "PaliGemma" (https://arxiv.org/abs/2407.07726): a prefix-LM, prompt ``answer en <question>``.
- Liu et al., 2023, LLaVA (https://arxiv.org/abs/2304.08485) and LLaVA-NeXT.
- TRL's ``examples/scripts/sft_vlm.py`` (labels of image/pad tokens masked); answer-only loss as in LLaMA-Factory.

One sample is the conversation ``[user: image(s) + question] [assistant: answer]`` built by the processor's chat
template (PaliGemma has none: prefix ``prompt`` + suffix answer, as its processor's ``suffix`` argument). Labels
are the tokens of the full conversation; every token of the prompt (system, user turn, image tokens, the
generation prompt) and the padding is -100, so the loss covers only the answer and its end-of-turn token. The
tokenized prompt must be a prefix of the tokenized conversation (checked for every sample). Nothing is ever
truncated: a sample longer than ``max_length`` is an error or is skipped (``too_long``), so image tokens are never cut.

Checkpoint directory: ``config.json`` (``model_type: chat_vlm``, the prompt and decoding settings, the base ``model``
id/dir), ``processor/`` (the processor files), and ``adapter/`` (the LoRA adapter in PEFT format; loaded over the
base model) and/or ``model/`` (full weights: ``--chat_vlm.merge true`` writes the LoRA-merged model, full
fine-tuning always writes it).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from vqakit.data.answers import normalize_answer
from vqakit.data.images import load_image
from vqakit.models.checkpoint import CONFIG_NAME, ConfigMixin

logger = logging.getLogger("vqakit")

Architecture = Literal["auto", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "paligemma", "llava", "llava_next"]
TooLong = Literal["error", "skip"]
Strategy = Literal["full", "frozen", "lora"]
ARCHITECTURES = get_args(Architecture)
TOO_LONG = get_args(TooLong)
# the module paths of each part inside the HF model (transformers 5.x)
PARTS = {
    "idefics3": {"vision": "model.vision_model", "projector": "model.connector", "lm": "model.text_model"},
    "qwen2_vl": {"vision": "model.visual", "projector": "model.visual.merger", "lm": "model.language_model"},
    "paligemma": {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
                  "lm": "model.language_model"},
    "llava": {"vision": "model.vision_tower", "projector": "model.multi_modal_projector", "lm": "model.language_model"},
}
FAMILY_OF = {"idefics3": "idefics3", "smolvlm": "idefics3", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl",
             "paligemma": "paligemma", "llava": "llava", "llava_next": "llava"}
# architectures trained on several images per conversation (PaliGemma and LLaVA 1.5/NeXT take one)
MULTI_IMAGE = ("idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl")
LM_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ChatVLMConfig(ConfigMixin):
    """A chat VLM for VQA (saved as ``config.json`` with ``model_type: chat_vlm``).

    Args:
        model: HF model id or local directory of an image-text-to-text model with its processor files
            (e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``).
        architecture: one of ``ARCHITECTURES`` or ``auto`` (read from the model's ``config.json``).
        system_prompt: system turn before the user's (empty: none; PaliGemma has no turns and ignores it).
        prompt: the user's text, ``{question}`` replaced by the question (empty: ``{question}``, and
            ``answer en {question}`` for PaliGemma, its VQA prefix).
        max_pixels: each image is resized (aspect kept) to at most this many pixels before the processor (0: as is).
        max_length: most tokens of one sample, image tokens included (0: no limit). Nothing is truncated.
        too_long: a training sample longer than ``max_length``: ``error`` or ``skip`` (logged with its question).
        max_new_tokens: most answer tokens generated.
        num_beams: beams of the generation (1: greedy).
        projector: the vision-to-LM projector's strategy: ``full`` (trains), ``frozen`` or ``lora``.
        lora_target_modules: LM modules that get LoRA (empty: the LM's attention q/k/v/o projections).
        merge: save the LoRA-merged full weights (``model/``) next to the adapter.
        load_in_4bit: load the base 4-bit NF4 (bitsandbytes, CUDA only; set by ``--train.text qlora``).
    """

    model: str = "HuggingFaceTB/SmolVLM-256M-Instruct"
    architecture: Architecture = "auto"
    system_prompt: str = ""
    prompt: str = ""
    max_pixels: int = 512 * 512
    max_length: int = 2048
    too_long: TooLong = "error"
    max_new_tokens: int = 8
    num_beams: int = 1
    projector: Strategy = "full"
    lora_target_modules: list[str] = field(default_factory=list)
    merge: bool = False
    load_in_4bit: bool = False

    model_type = "chat_vlm"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"--chat_vlm.architecture={self.architecture!r} is not one of {ARCHITECTURES}")
        if self.too_long not in TOO_LONG:
            raise ValueError(f"--chat_vlm.too_long={self.too_long!r} is not one of {TOO_LONG}")
        if self.projector not in get_args(Strategy):
            raise ValueError(f"--chat_vlm.projector={self.projector!r} is not one of {get_args(Strategy)}")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(f"--chat_vlm.num_beams={self.num_beams} and --chat_vlm.max_new_tokens="
                             f"{self.max_new_tokens} must be at least 1")
        if self.max_pixels < 0 or self.max_length < 0:
            raise ValueError(f"--chat_vlm.max_pixels={self.max_pixels} and --chat_vlm.max_length={self.max_length} "
                             f"must be >= 0")
        if self.prompt and "{question}" not in self.prompt:
            raise ValueError(f"--chat_vlm.prompt={self.prompt!r} has no {{question}} placeholder")


def detect_architecture(model: str) -> str:
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as err:
        raise ValueError(f"--chat_vlm.model={model!r} is not a loadable Hugging Face model id or directory "
                         f"(no network here? pass a local directory): {err}") from err
    if model_type not in FAMILY_OF:
        raise ValueError(f"--chat_vlm.model={model!r} is a {model_type!r} model; supported: {sorted(FAMILY_OF)}")
    return model_type


def load_hf_processor(path: str, architecture: str):
    """``AutoProcessor.from_pretrained``; for Qwen2-VL without torchvision (its video processor needs it) the
    processor is built from its image processor and tokenizer alone (images work, videos do not)."""
    from transformers import AutoProcessor

    qwen_without_torchvision = (FAMILY_OF[architecture] == "qwen2_vl"
                                and importlib.util.find_spec("torchvision") is None)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, TypeError):
        if not qwen_without_torchvision:
            raise
        processor = None
    if getattr(processor, "image_processor", None) is None and qwen_without_torchvision:
        # AutoProcessor falls back to the tokenizer alone when the processor class cannot be built
        logger.info("Qwen2-VL processor without its video processor (torchvision is not installed)")
        processor = _qwen2_vl_image_processor_class().from_pretrained(path)
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path} has no image processor (preprocessor_config.json / processor_config.json): "
                         f"AutoProcessor gave a {type(processor).__name__}")
    return processor


def _qwen2_vl_image_processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageProcessorOnly(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` with no video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageProcessorOnly


def fit_pixels(image, max_pixels: int):
    """Resize a PIL image (aspect kept) so that width * height <= ``max_pixels`` (0: unchanged)."""
    w, h = image.size
    if not max_pixels or w * h <= max_pixels:
        return image
    scale = (max_pixels / (w * h)) ** 0.5
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))))


class ChatVLMProcessor:
    """Builds model inputs from images + questions (+ answers) with the HF processor's chat template.

    ``image(source)`` returns the loaded, resized PIL image (what the predictor batches); ``batch(images,
    questions, answers)`` returns the processor's tensors, and ``labels`` when answers are given."""

    def __init__(self, hf_processor, config: ChatVLMConfig):
        self.hf = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.config = config
        self.arch = config.architecture
        self.family = FAMILY_OF[self.arch]
        self.prompt = config.prompt or ("answer en {question}" if self.family == "paligemma" else "{question}")
        if self.family != "paligemma" and not getattr(hf_processor, "chat_template", None):
            raise ValueError(f"the processor of {config.model!r} has no chat template (chat_template.jinja); "
                             f"an instruction-tuned checkpoint ships one")
        if self.family == "qwen2_vl" and config.max_pixels:  # its resize budget: size["longest_edge"] pixels
            ip = hf_processor.image_processor
            ip.size = {**dict(ip.size), "longest_edge": min(config.max_pixels, dict(ip.size).get("longest_edge")
                                                            or config.max_pixels)}

    def image(self, source):
        return fit_pixels(load_image(source).convert("RGB"), self.config.max_pixels)

    def _texts(self, n_images: list[int], questions: list[str], answers: list[str] | None):
        """The prompt (with the generation prompt) and, with answers, the full conversation of each sample."""
        prompts, fulls = [], []
        for i, (n, q) in enumerate(zip(n_images, questions)):
            user = self.prompt.format(question=q.strip())
            if self.family == "paligemma":
                prompts.append(user)
                continue
            messages = []
            if self.config.system_prompt:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]})
            messages.append({"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": user}]})
            prompts.append(self.hf.apply_chat_template(messages, add_generation_prompt=True))
            if answers is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i].strip()}]})
                fulls.append(self.hf.apply_chat_template(messages))
        return prompts, fulls

    def _call(self, texts, images, suffix=None, padding_side="right"):
        self.tokenizer.padding_side = padding_side
        kwargs = {"suffix": suffix} if suffix is not None else {}
        if self.family == "paligemma":
            images = [im[0] for im in images]  # one image per sample (checked before)
        enc = self.hf(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)
        enc.pop("labels", None)
        return dict(enc)

    def check_images(self, images: list[list]) -> None:
        for i, ims in enumerate(images):
            if not ims:
                raise ValueError(f"sample {i} has no image")
            if len(ims) > 1 and self.arch not in MULTI_IMAGE:
                raise ValueError(f"sample {i} has {len(ims)} images, but {self.arch} takes one image per question; "
                                 f"architectures with several: {MULTI_IMAGE}")

    def batch(self, images: list[list], questions: list[str], answers: list[str] | None = None,
              padding_side: str = "right") -> dict[str, torch.Tensor]:
        """``images[i]`` (PIL images) and ``questions[i]`` -> the processor's tensors; with ``answers``, ``labels``
        (B, T): the answer tokens, -100 everywhere else (prompt, image tokens, padding)."""
        self.check_images(images)
        prompts, fulls = self._texts([len(ims) for ims in images], questions, answers)
        if answers is None:
            return self._call(prompts, images, padding_side=padding_side)
        if self.family == "paligemma":
            enc = self._call(prompts, images, suffix=[a.strip() for a in answers])
        else:
            enc = self._call(fulls, images)
        prompt_enc = self._call(prompts, images)  # right-padded: each prompt starts at position 0
        labels = torch.full_like(enc["input_ids"], -100)
        for i in range(len(questions)):
            full = enc["input_ids"][i][enc["attention_mask"][i].bool()]
            n = int(prompt_enc["attention_mask"][i].sum())
            prompt = prompt_enc["input_ids"][i][:n]
            if len(full) <= n or not torch.equal(full[:n], prompt):
                raise ValueError(f"the tokenized prompt of question {questions[i]!r} is not a prefix of the tokenized "
                                 f"conversation with its answer {answers[i]!r}: the chat template of "
                                 f"{self.config.model!r} cannot train an answer-only loss")
            labels[i, n : len(full)] = full[n:]
        enc["labels"] = labels
        return enc

    def lengths(self, images: list[list], questions: list[str], answers: list[str]) -> list[int]:
        enc = self.batch(images, questions, answers)
        return enc["attention_mask"].sum(1).tolist()

    def save_pretrained(self, save_dir) -> None:
        self.hf.save_pretrained(save_dir)


@dataclass
class ChatVLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None = None
    answer_exact: torch.Tensor | None = None


class ChatVLMForQuestionAnswering(nn.Module):
    """A chat VLM behind vqakit's generative interface: ``forward(**batch)`` -> loss (answer tokens only),
    ``generate(images, questions)`` -> ``[(answer, probability)]``."""

    def __init__(self, config: ChatVLMConfig, model: nn.Module, hf_processor):
        super().__init__()
        self.config = config
        self.model = model
        self.arch = config.architecture
        self.family = FAMILY_OF[self.arch]
        self.processor = ChatVLMProcessor(hf_processor, config)

    @classmethod
    def build(cls, config: ChatVLMConfig, device: str = "cpu", processor_dir: str | None = None,
              weights: str | None = None) -> "ChatVLMForQuestionAnswering":
        """Load the base ``config.model`` (or ``weights``) with the processor of ``processor_dir or config.model``."""
        from transformers import AutoModelForImageTextToText

        if config.architecture == "auto":
            config.architecture = detect_architecture(config.model)
        kwargs = {}
        if config.load_in_4bit:
            if not torch.cuda.is_available():
                raise RuntimeError("--train.text=qlora (4-bit NF4 base) needs a CUDA GPU (bitsandbytes kernels); on "
                                   "CPU use --train.text lora or full")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise RuntimeError("--train.text=qlora needs bitsandbytes: pip install 'vqakit[gpu]'")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": device}
        source = weights or config.model
        try:
            processor = load_hf_processor(processor_dir or config.model, config.architecture)
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        except OSError as err:
            raise ValueError(f"--chat_vlm.model={source!r} could not be loaded with its processor: {err}") from err
        return cls(config, model, processor)

    # -- parts and strategies ---------------------------------------------------------------------------------

    def base_model(self) -> nn.Module:
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def part(self, name: str) -> nn.Module:
        """``vision``, ``projector`` or ``lm`` (the language model without its output head)."""
        return self.base_model().get_submodule(PARTS[self.family][name])

    def part_prefixes(self) -> dict[str, str]:
        return dict(PARTS[self.family])

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.model]

    def default_lora_targets(self) -> str:
        """A PEFT regex over the LM's attention projections (not the vision tower's, which share the names)."""
        lm = PARTS[self.family]["lm"].replace(".", r"\.")
        return rf"(.*\.)?{lm}\.layers\.\d+\.self_attn\.({'|'.join(LM_ATTENTION)})"

    # -- training ---------------------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, labels, **mm) -> ChatVLMOutput:
        """``labels`` (B, T) are -100 outside the answers; ``answer_exact`` (B,): every answer token is the argmax."""
        mm.pop("answers", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **mm)
        logits = out.logits[:, :-1].float()  # (B, T-1, V) predicts token t+1
        target = labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        hit = (logits.argmax(-1) == target) | (target == -100)
        return ChatVLMOutput(loss=loss, logits=out.logits, answer_exact=hit.all(1))

    # -- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, images: list[list], questions: list[str], **unused) -> list[tuple[str, float]]:
        """Left-padded batch generation (greedy or beam search); answers normalised as every generative answer."""
        device = next(self.model.parameters()).device
        enc = self.processor.batch(images, questions, padding_side="left")
        enc = {k: v.to(device) for k, v in enc.items()}
        tok = self.processor.tokenizer
        eos = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>"),
                           tok.convert_tokens_to_ids("<|im_end|>")} if t is not None and t != tok.unk_token_id]
        out = self.model.generate(**enc, max_new_tokens=self.config.max_new_tokens, num_beams=self.config.num_beams,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True,
                                  eos_token_id=eos or None, pad_token_id=tok.pad_token_id)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        scores = self.model.compute_transition_scores(out.sequences, out.scores, getattr(out, "beam_indices", None),
                                                      normalize_logits=self.config.num_beams == 1)
        keep = ~torch.isin(new, torch.tensor(eos + [tok.pad_token_id], device=new.device))
        probs = (scores.float().nan_to_num(0.0).clamp(max=0) * keep[:, : scores.shape[1]]).sum(-1).exp()
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return [(normalize_answer(t), float(p)) for t, p in zip(texts, probs)]

    # -- serving helpers (vqakit.inference.generative.GenerativePredictor) -----------------------------------------------------

    def decoding_settings(self) -> dict:
        c = self.config
        return {"architecture": self.arch, "system_prompt": c.system_prompt, "prompt": self.processor.prompt,
                "max_new_tokens": c.max_new_tokens, "num_beams": c.num_beams, "max_pixels": c.max_pixels}

    def answer_image(self, processor, image, questions: list[str], device="cpu", **unused):
        return self.answer_images(processor, [image], [questions], device)[0]

    def answer_images(self, processor, images: list, questions: list[list[str]], device="cpu",
                      **unused) -> list[list[tuple[str, float]]]:
        """``images[i]`` (a source, a PIL image or a list of them) with ``questions[i]`` about it, in one batch."""
        per_image = [[processor.image(s) for s in (im if isinstance(im, (list, tuple)) else [im])] for im in images]
        flat = self.generate([per_image[i] for i, qs in enumerate(questions) for _ in qs],
                             [q for qs in questions for q in qs])
        out, k = [], 0
        for qs in questions:
            out.append(flat[k : k + len(qs)])
            k += len(qs)
        return out

    def batch_inputs(self, processor, examples, use_cache: bool = True, cache_dir=None, progress: bool = True):
        return lambda s, e: {"images": [[processor.image(p) for p in example_images(x)] for x in examples[s:e]],
                             "questions": [x.question for x in examples[s:e]]}

    # -- checkpoint directory --------------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | Path, merge: bool | None = None) -> Path:
        """``adapter/`` (PEFT) when LoRA ran; ``model/`` when merging or fully fine-tuned; ``processor/``."""
        from peft import PeftModel

        merge = self.config.merge if merge is None else merge
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, PeftModel):
            self.model.save_pretrained(save_dir / "adapter")
            if merge:
                if self.config.load_in_4bit:
                    raise ValueError("--chat_vlm.merge=true over a 4-bit base: merge the adapter into the full-"
                                     "precision base instead (vqakit keeps the adapter in adapter/)")
                import copy

                copy.deepcopy(self.model).merge_and_unload().save_pretrained(save_dir / "model")
        else:
            self.model.save_pretrained(save_dir / "model")
        self.processor.save_pretrained(save_dir / "processor")
        self.config.save_json(save_dir, load_in_4bit=False)
        return save_dir

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str = "cpu",
                        prefer: str = "model") -> "ChatVLMForQuestionAnswering":
        """Load ``model/`` (merged or full weights) or else the base ``model`` + ``adapter/``; ``prefer="adapter"``
        loads base + adapter even when merged weights exist."""
        checkpoint_dir = Path(checkpoint_dir)
        config = ChatVLMConfig.from_json(checkpoint_dir)
        merged, adapter = checkpoint_dir / "model", checkpoint_dir / "adapter"
        use_merged = (merged / CONFIG_NAME).is_file() and not (prefer == "adapter" and adapter.is_dir())
        if not use_merged and not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{checkpoint_dir} has neither model/ (full weights) nor adapter/ (LoRA)")
        net = cls.build(config, device, processor_dir=str(checkpoint_dir / "processor"),
                        weights=str(merged) if use_merged else None)
        if not use_merged:
            from peft import PeftModel

            net.model = PeftModel.from_pretrained(net.model, str(adapter))
        return net.eval()


def example_images(example) -> list[str]:
    """The image paths of an example (``image`` is one path or a list of paths)."""
    return list(example.image) if isinstance(example.image, (list, tuple)) else [example.image]
