"""GRU-decoder family: teacher forcing, greedy / beam decoding, save/load, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from vqakit.cli import main
from vqakit.data.sources import easy_vqa_data_dir
from vqakit.models.gru_decoder import GRUDecoderConfig, GRUDecoderForQuestionAnswering, build_word_vocab
from vqakit.towers.text import TextTowerConfig, load_tokenizer
from vqakit.towers.vision import VisionTowerConfig

ANSWERS = ["yes", "no", "red", "red circle", "blue triangle", "2"]


@pytest.fixture
def tiny_gru(tiny_vision_tower, tiny_text_tower):
    def make(**overrides):
        kwargs = dict(vision=VisionTowerConfig(tiny_vision_tower, image_size=32),
                      text=TextTowerConfig(tiny_text_tower, max_length=16), hidden_size=32, num_heads=4,
                      word_embed_dim=16, vocab=build_word_vocab(ANSWERS))
        kwargs.update(overrides)
        torch.manual_seed(0)
        return GRUDecoderForQuestionAnswering(GRUDecoderConfig(**kwargs))

    return make


def test_config_validation():
    with pytest.raises(ValueError, match="--gru.decoding='sample'"):
        GRUDecoderConfig(decoding="sample")
    with pytest.raises(ValueError, match="--gru.fusion"):
        GRUDecoderConfig(fusion="bilinear")


@pytest.mark.parametrize("fusion", ["gated", "concat", "cross-attention"])
def test_teacher_forcing_learns_and_every_trainable_param_gets_a_gradient(tiny_gru, tiny_text_tower, tiny_batch,
                                                                         fusion):
    model = tiny_gru(fusion=fusion).train()
    batch = tiny_batch(load_tokenizer(tiny_text_tower))
    answers = ["red circle", "yes", "2"]
    out = model(answers=answers, **batch)
    assert out.logits.shape == (3, 3, len(model.config.vocab))  # <bos> red circle -> red circle <eos>
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("backbone.vision", "backbone.text")):
            continue
        assert p.grad is not None, name
    model.zero_grad()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # no dropout: the loss must go down on a fixed batch
    for _ in range(60):
        loss = model(answers=answers, **batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert [a for a, _ in model.generate(**batch)] == answers
    assert [a for a, _ in model.generate(decoding="beam", num_beams=3, **batch)] == answers
    assert bool(model(answers=answers, **batch).answer_exact.all())


def test_beam_of_one_equals_greedy_and_scores_are_probabilities(tiny_gru, tiny_text_tower, tiny_batch):
    model = tiny_gru().eval()
    batch = tiny_batch(load_tokenizer(tiny_text_tower))
    greedy = model.generate(decoding="greedy", **batch)
    beam1 = model.generate(decoding="beam", num_beams=1, **batch)
    assert [a for a, _ in greedy] == [a for a, _ in beam1]
    for (_, p), (_, q) in zip(greedy, beam1):
        assert 0 < p <= 1 and p == pytest.approx(q, rel=1e-4)
    beam3 = model.generate(decoding="beam", num_beams=3, **batch)
    for (_, p), (_, q) in zip(greedy, beam3):  # without a length penalty a wider beam never scores lower
        assert q >= p - 1e-6
    for answer, _ in model.generate(max_answer_length=1, **batch):
        assert len(answer.split()) <= 1


def test_save_load_round_trip(tiny_gru, tiny_text_tower, tiny_batch, tmp_path):
    model = tiny_gru(decoding="beam", num_beams=2, length_penalty=0.6).eval()
    tok = load_tokenizer(tiny_text_tower)
    batch = tiny_batch(tok)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "gru_decoder" and config["decoding"] == "beam" and config["num_beams"] == 2
    loaded = GRUDecoderForQuestionAnswering.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(answers=["red"] * 3, **batch).logits, model(answers=["red"] * 3, **batch).logits)
    assert loaded.generate(**batch) == model.generate(**batch)


def test_cli_train_evaluate_predict(tiny_vision_tower, tiny_text_tower, tmp_path, capsys):
    gru = ["--gru.vision.name", tiny_vision_tower, "--gru.text.name", tiny_text_tower, "--gru.vision.image_size", "32",
           "--gru.hidden_size", "32", "--gru.num_heads", "4", "--gru.vision.multiscale", "false",
           "--gru.decoding", "beam", "--gru.num_beams", "2"]
    main(["train", *gru, "--data.limit", "40", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(tmp_path / "run"), "--train.epochs", "1", "--train.batch_size", "16",
          "--train.progress", "false"])
    out = capsys.readouterr().out
    assert "VQA accuracy (official)" in out and "BERTScore F1 (MiniLM-L6)" in out
    ckpt = tmp_path / "run" / "checkpoint"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert {"config.json", "model.safetensors", "answer_vocab.json", "training_metadata.json",
            "text_tower", "README.md"} <= {p.name for p in ckpt.iterdir()}
    assert "gru-decoder" in (ckpt / "README.md").read_text()  # the model card names the family
    results = json.loads((ckpt / "eval-easy-vqa-test" / "results.json").read_text())
    assert all(isinstance(r["answer"], str) for r in results)
    metrics = json.loads((ckpt / "eval-easy-vqa-test" / "metrics.json").read_text())
    assert metrics["decoding"] == {"decoding": "beam", "num_beams": 2, "length_penalty": 0.0, "max_answer_length": 6}
    g = metrics["generative"]
    assert g["vqa_accuracy"] == metrics["vqa_accuracy"] and 0 <= g["token_f1"] <= 100 and "bleu" in g
    assert set(g["per_answer_type"]) <= {"yes/no", "other"} and "bertscore_f1" in g["per_answer_type"]["other"]

    main(["evaluate", "--checkpoint", str(ckpt), "--data.limit", "40", "--data.cache_dir", str(tmp_path / "cache"),
          "--out_dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["vqa_accuracy"] == metrics["vqa_accuracy"]
    image = str(easy_vqa_data_dir() / "test" / "images" / "0.png")
    capsys.readouterr()
    main(["predict", "--checkpoint", str(ckpt), "--image", image, "--question", "what is the color of the shape?",
          "--question+", "is there a circle?"])
    assert capsys.readouterr().out.count("Q: ") == 2
