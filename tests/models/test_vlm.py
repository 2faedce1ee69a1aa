"""Pretrained VLMs (BLIP, ViLT) + LoRA with tiny random configs saved locally: load by path, train, predict."""

from __future__ import annotations

import json

import pytest
import torch

from vqakit.models.vlm import VLMConfig, VLMForQuestionAnswering


def _tokenizer(tiny_text_tower):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(tiny_text_tower)


@pytest.fixture(scope="module")
def tiny_blip(tiny_text_tower, tmp_path_factory) -> str:
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    path = tmp_path_factory.mktemp("tiny-blip")
    tok = _tokenizer(tiny_text_tower)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                         bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(path)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_vilt(tiny_text_tower, tmp_path_factory) -> str:
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    path = tmp_path_factory.mktemp("tiny-vilt")
    tok = _tokenizer(tiny_text_tower)
    labels = ["yes", "no", "red"]
    config = ViltConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, image_size=32, patch_size=8, max_position_embeddings=64,
                        id2label=dict(enumerate(labels)), label2id={a: i for i, a in enumerate(labels)})
    torch.manual_seed(0)
    ViltForQuestionAnswering(config).save_pretrained(path)
    ViltProcessor(ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8), tok).save_pretrained(path)
    return str(path)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="--vlm.architecture='clip'"):
        VLMConfig(architecture="clip")
    with pytest.raises(ValueError, match="not a loadable"):
        VLMForQuestionAnswering.build(VLMConfig(model=str(tmp_path / "nothing")))


@pytest.mark.parametrize("arch", ["blip", "vilt"])
def test_lora_training_step_prediction_and_round_trip(arch, tiny_blip, tiny_vilt, tmp_path):
    from vqakit.train.config import TrainConfig
    from vqakit.train.vlm_family import apply_strategies

    path = tiny_blip if arch == "blip" else tiny_vilt
    id2label = {0: "red", 1: "circle", 2: "yes", 3: "no"}
    model = VLMForQuestionAnswering.build(VLMConfig(model=path, max_answer_length=4), id2label=id2label)
    assert model.arch == arch
    if arch == "vilt":
        assert model.config.id2label == id2label and model.model.classifier[-1].out_features == 4
    params = apply_strategies(model, TrainConfig(text="lora", lora_text={"rank": 2, "alpha": 4}))
    assert 0 < params["trainable"] < params["total"]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    p = model.processor
    image = (torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()
    batch = {"pixel_values": p.images([image, image]), **p.text(["is there a red circle?", "what color?"])}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    out = model(answers=["yes", "red"], **batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(q.grad is not None for n, q in model.named_parameters() if "lora_" in n)
    opt.step()
    for n, q in model.named_parameters():  # LoRA: base weights unchanged
        if n in base:
            torch.testing.assert_close(q, base[n])
    model.eval()
    answers = model.answer_image(p, image, ["is there a red circle?", "what color?"])
    assert len(answers) == 2 and all(isinstance(a, str) and 0 <= s <= 1 for a, s in answers)

    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapters" / "vlm" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "vlm"
    loaded = VLMForQuestionAnswering.from_pretrained(tmp_path / "ckpt")
    again = loaded.answer_image(loaded.processor, image, ["is there a red circle?", "what color?"])
    assert [a for a, _ in again] == [a for a, _ in answers]
    assert [s for _, s in again] == pytest.approx([s for _, s in answers], abs=1e-4)


def test_cli_train_evaluate_predict_vilt(tiny_vilt, tmp_path, capsys):
    from vqakit.cli import main
    from vqakit.data.sources import easy_vqa_data_dir

    main(["train", "--vlm.model", tiny_vilt, "--vlm.image_size", "32", "--train.text", "lora",
          "--train.lora_text.rank", "2", "--data.limit", "24", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(tmp_path / "run"), "--train.epochs", "1", "--train.batch_size", "8",
          "--train.progress", "false"])
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "vlm" / "model.safetensors").is_file() and (ckpt / "adapters" / "vlm").is_dir()
    metrics = json.loads((ckpt / "eval-easy-vqa-test" / "metrics.json").read_text())
    assert metrics["decoding"]["architecture"] == "vilt" and "bleu" in metrics["generative"]
    image = str(easy_vqa_data_dir() / "test" / "images" / "0.png")
    capsys.readouterr()
    main(["predict", "--checkpoint", str(ckpt), "--image", image, "--question", "what is the color of the shape?"])
    assert capsys.readouterr().out.count("Q: ") == 1
