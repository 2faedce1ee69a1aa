"""The pretrained-VLM family in training: BLIP / ViLT fine-tuned with LoRA (or fully).

``--train.text`` is the whole VLM's strategy here: ``lora`` (adapters on ``--vlm.lora_target_modules``, default
the attention query/value projections; rank / alpha / dropout from ``--train.lora_text.*``), ``full``, or
``frozen`` (ViLT only: just the new answer classifier trains). ViLT's classifier is re-initialised for the
training data's answer list and always trains (PEFT ``modules_to_save``).
"""

from __future__ import annotations

from vqakit.data.answers import AnswerVocab
from vqakit.models.vlm import VLMConfig, VLMForQuestionAnswering
from vqakit.train.datamodule import VQADataset
from vqakit.train.recipes import count_parameters, wrap_lora

KEY = "vlm"


def build(cfg: VLMConfig, train_examples, train):
    vocab = AnswerVocab.build([e.answers for e in train_examples])
    net = VLMForQuestionAnswering.build(cfg, id2label=vocab.id2label)
    return net, net.processor


def dataset(examples, vocab, net, processor, train, data):
    return VQADataset(examples, vocab, processor)  # the VLM's own towers run on raw pixels and tokens


def apply_strategies(net, train):
    strategy = train.text
    if strategy not in ("lora", "full", "frozen"):
        raise ValueError(f"--train.text={strategy!r}: for a VLM use 'lora', 'full' or 'frozen' (ViLT head only)")
    if strategy == "frozen" and net.arch != "vilt":
        raise ValueError("--train.text=frozen trains only ViLT's answer classifier; BLIP would train nothing")
    net.model.requires_grad_(strategy == "full")
    if net.arch == "vilt":
        net.model.classifier.requires_grad_(True)
    if strategy == "lora":
        targets = train.lora_text.target_modules or net.default_lora_targets()
        try:
            net.model = wrap_lora(net.model, train.lora_text, targets,
                                  modules_to_save=["classifier"] if net.arch == "vilt" else None)
        except ValueError as err:
            raise ValueError(f"LoRA target modules {targets} do not match {type(net.model).__name__} "
                             f"(--vlm.lora_target_modules): {err}") from err
    return count_parameters(net)


def save(net, processor, ckpt) -> None:
    net.float().save_pretrained(ckpt)
