"""The chat-VLM family in training: SmolVLM / Qwen2-VL / PaliGemma / LLaVA fine-tuned on answer tokens only.

Each part has its own strategy:
- the LM: ``--train.text`` ``lora`` (adapters on ``--train.lora_text.target_modules``, else
  ``--chat_vlm.lora_target_modules``, else the LM's attention q/k/v/o projections), ``qlora`` (the same over a
  4-bit NF4 base; CUDA only), ``full`` or ``frozen``;
- the vision tower: ``--train.vision`` ``frozen`` (default), ``lora`` (its attention/MLP linears) or ``full``;
- the projector: ``--chat_vlm.projector`` ``full`` (default), ``frozen`` or ``lora``.

Batches hold the loaded images (resized within ``--chat_vlm.max_pixels``) and the processor builds the
conversation; a sample longer than ``--chat_vlm.max_length`` tokens is an error or skipped (``--chat_vlm.too_long``).
"""

from __future__ import annotations

import logging
import re

import torch
from torch.utils.data import Dataset

from vqakit.data.answers import majority_answer
from vqakit.models.chat_vlm import ChatVLMConfig, ChatVLMForQuestionAnswering, example_images
from vqakit.train.recipes import count_parameters, wrap_lora

KEY = "chat_vlm"
MULTI_IMAGE = True  # examples may name several images; each architecture's limit is checked in ``dataset``
logger = logging.getLogger("vqakit")
VISION_LORA = r"(q_proj|k_proj|v_proj|out_proj|qkv|proj|fc1|fc2)"


def build(cfg: ChatVLMConfig, train_examples, train):
    if train.text == "qlora":
        cfg.load_in_4bit = True
    device = "cuda" if torch.cuda.is_available() and train.accelerator in ("gpu", "cuda", "auto") else "cpu"
    net = ChatVLMForQuestionAnswering.build(cfg, device=device)
    return net, net.processor


class ChatVLMDataset(Dataset):
    """Examples -> ``{"index", "images", "question", "answer"}`` (images loaded and resized by the processor)."""

    def __init__(self, examples, processor):
        self.examples, self.processor = examples, processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"index": i, "images": [self.processor.image(p) for p in example_images(e)], "question": e.question,
                "answer": majority_answer(e.answers), "question_id": e.question_id}


class ChatVLMCollator:
    """Items -> ``{"index", "answers", "chat_inputs"}``: the processor's tensors with answer-only ``labels``.
    Samples over ``max_length`` tokens raise, or are dropped and logged (``too_long=skip``)."""

    def __init__(self, processor):
        self.processor = processor
        self.skipped: list[int] = []

    def __call__(self, items: list[dict]) -> dict:
        p, limit = self.processor, self.processor.config.max_length
        enc = p.batch([it["images"] for it in items], [it["question"] for it in items], [it["answer"] for it in items])
        lengths = enc["attention_mask"].sum(1).tolist()
        too_long = [j for j, n in enumerate(lengths) if limit and n > limit]
        if too_long:
            details = ", ".join(f"question {items[j]['question_id']} ({lengths[j]} tokens)" for j in too_long)
            if p.config.too_long == "error":
                raise ValueError(f"{details} longer than --chat_vlm.max_length={limit} (image tokens included); "
                                 f"raise it, lower --chat_vlm.max_pixels, or skip them (--chat_vlm.too_long skip)")
            logger.warning("skipped %s: longer than --chat_vlm.max_length=%d", details, limit)
            self.skipped += [items[j]["question_id"] for j in too_long]
            items = [it for j, it in enumerate(items) if j not in too_long]
            if not items:
                raise ValueError(f"every sample of a batch is longer than --chat_vlm.max_length={limit}")
            return self(items)
        return {"index": torch.tensor([it["index"] for it in items]), "answers": [it["answer"] for it in items],
                "chat_inputs": enc}


def dataset(examples, vocab, net, processor, train, data):
    """Refuses up front questions with several images for the architectures that take one."""
    from vqakit.models.chat_vlm import MULTI_IMAGE as MULTI_IMAGE_ARCHS

    if net.arch not in MULTI_IMAGE_ARCHS:
        for e in examples:
            if len(example_images(e)) > 1:
                raise ValueError(f"question {e.question_id} is about {len(e.image)} images, but {net.arch} takes one "
                                 f"image per question; architectures with several: {MULTI_IMAGE_ARCHS}")
    return ChatVLMDataset(examples, processor)


def collator(processor):
    return ChatVLMCollator(processor)


def apply_strategies(net: ChatVLMForQuestionAnswering, train):
    text, vision, projector = train.text, train.vision, net.config.projector
    if text not in ("lora", "qlora", "full", "frozen"):
        raise ValueError(f"--train.text={text!r}: for a chat VLM (the LM) use 'lora', 'qlora', 'full' or 'frozen'")
    if vision not in ("frozen", "lora", "full"):
        raise ValueError(f"--train.vision={vision!r}: for a chat VLM use 'frozen', 'lora' or 'full'")
    if text == "frozen" and vision == "frozen" and projector == "frozen":
        raise ValueError("--train.text, --train.vision and --chat_vlm.projector are all frozen: nothing would train")
    model = net.model
    prefixes = net.part_prefixes()
    model.requires_grad_(False)
    if text == "full":
        net.part("lm").requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    if vision == "full":
        net.part("vision").requires_grad_(True)
    if projector == "full":
        net.part("projector").requires_grad_(True)
    elif projector == "frozen":
        net.part("projector").requires_grad_(False)
    targets = []
    if text in ("lora", "qlora"):
        user = train.lora_text.target_modules or net.config.lora_target_modules
        lm = re.escape(prefixes["lm"])
        targets.append(rf"(.*\.)?{lm}\..*\.({'|'.join(map(re.escape, user))})" if user
                       else net.default_lora_targets())
    if vision == "lora":
        vis = re.escape(prefixes["vision"])
        targets.append(rf"(.*\.)?{vis}\..*\.{VISION_LORA}")
    if projector == "lora":
        targets.append(rf"(.*\.)?{re.escape(prefixes['projector'])}\..*")
    if targets:
        from peft import prepare_model_for_kbit_training

        if text == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # fully trained parts next to the adapters are saved with them (PEFT modules_to_save)
        full = [prefixes[name] for name, s in (("lm", text), ("vision", vision), ("projector", projector)) if s == "full"]
        if text == "full":
            full.append("lm_head")
        pattern = "|".join(f"(?:{t})" for t in targets)
        try:
            model = wrap_lora(model, train.lora_text, pattern,
                              modules_to_save=[f.rsplit(".", 1)[-1] for f in full] or None)
        except ValueError as err:
            raise ValueError(f"LoRA target modules {pattern!r} do not match {type(model).__name__} "
                             f"(--train.lora_text.target_modules / --chat_vlm.lora_target_modules): {err}") from err
        net.model = model
    return count_parameters(net)


def save(net, processor, ckpt) -> None:
    if not net.config.load_in_4bit:
        net.float()
    net.save_pretrained(ckpt)
