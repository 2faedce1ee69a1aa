"""The GRU-decoder family in training: word vocabulary from the training answers, towers as the classifier's."""

from __future__ import annotations

from vqakit.data.answers import majority_answer
from vqakit.models.gru_decoder import GRUDecoderConfig, GRUDecoderForQuestionAnswering, build_word_vocab
from vqakit.towers.processor import VQAProcessor
from vqakit.train.run import classifier_dataset
from vqakit.train.recipes import apply_strategies as _apply_tower_strategies

KEY = "gru"


def build(cfg: GRUDecoderConfig, train_examples, train):
    cfg.vocab = build_word_vocab([majority_answer(e.answers) for e in train_examples])
    net = GRUDecoderForQuestionAnswering(cfg, pretrained_towers=True)
    return net, VQAProcessor.from_config(cfg)


dataset = classifier_dataset


def apply_strategies(net, train):
    """``train.vision`` / ``train.text`` per tower, exactly as for the classifier; fusion + decoder train."""
    return _apply_tower_strategies(net, train)


def save(net, processor, ckpt) -> None:
    from vqakit.train.recipes import merge_lora

    merge_lora(net, ckpt / "adapters")
    net.float().save_pretrained(ckpt, tokenizer=processor.tokenizer)
