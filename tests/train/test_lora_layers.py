"""LoRA on the last N layers of a tower (``--train.lora_<tower>.layers N``): where the adapters go, that the
frozen layers below build no autograd graph, that the model starts as the base model, bad N, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.towers.text import load_tokenizer
from vqakit.train.config import LoraSettings, TrainConfig
from vqakit.train.recipes import add_lora, apply_strategies, merge_lora, towers


@pytest.fixture
def tokenizer(tiny_text_tower):
    return load_tokenizer(tiny_text_tower)


def _model(tiny_config, layers: int, text_layers: int | None = None, **overrides):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(dropout=0.0, **overrides))
    text_layers = layers if text_layers is None else text_layers
    cfg = TrainConfig(vision="lora", text="lora", lora_vision=LoraSettings(rank=2, dropout=0.0, layers=layers),
                      lora_text=LoraSettings(rank=2, dropout=0.0, layers=text_layers))
    apply_strategies(model, cfg)
    return model


def _adapted_groups(tower) -> list[bool]:
    """For each of the tower's layer groups, input side first: does it hold LoRA weights?"""
    return [any("lora_" in n for n, _ in group.named_parameters()) for group in tower.layer_groups()]


def _group_outputs_need_grad(model, batch) -> dict[str, list[bool]]:
    """Run forward in train mode; for each layer group of each tower, does its output carry an autograd graph?"""
    seen, handles = {}, []
    for name, tower in towers(model).items():
        seen[name] = [None] * len(tower.layer_groups())
        for i, group in enumerate(tower.layer_groups()):
            modules = list(group) if isinstance(group, torch.nn.ModuleList) else [group]

            def hook(module, args, out, name=name, i=i):
                out = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
                seen[name][i] = bool(seen[name][i]) or out.requires_grad

            handles += [m.register_forward_hook(hook) for m in modules]
    model.train()
    model(**batch).logits.sum().backward()
    for h in handles:
        h.remove()
    return seen


def test_adapters_only_in_the_last_n_layers(tiny_config):
    model = _model(tiny_config, layers=1)
    for name, tower in towers(model).items():  # tiny towers: embeddings + 2 layers
        assert _adapted_groups(tower) == [False, False, True], name
    everywhere = _model(tiny_config, layers=0)
    for name, tower in towers(everywhere).items():
        assert _adapted_groups(tower) == [False, True, True], name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.text.")]
    assert trainable and all("lora_" in n and ".layer.1." in n for n in trainable)


def test_layers_below_the_adapters_build_no_graph_and_get_no_grad(tiny_config, tiny_batch, tokenizer):
    batch = tiny_batch(tokenizer)
    model = _model(tiny_config, layers=1)
    seen = _group_outputs_need_grad(model, batch)
    for name in ("vision", "text"):
        assert seen[name] == [False, False, True], name  # embeddings and layer 0 ran without a graph
    for name, tower in towers(model).items():
        for group in tower.layer_groups()[:-1]:
            assert all(p.grad is None for p in group.parameters()), name
        lora = [p for n, p in tower.named_parameters() if "lora_A" in n]
        assert lora and all(p.grad is not None for p in lora), name
    # with adapters in every layer, layer 0's output does carry a graph: the check above can fail
    seen_all = _group_outputs_need_grad(_model(tiny_config, layers=0), batch)
    assert seen_all["text"] == [False, True, True] and seen_all["vision"] == [False, True, True]


def test_efficientnet_last_blocks_only_and_no_graph_below(tiny_config):
    model = _model(tiny_config, layers=3, text_layers=1,
                   vision={"name": "efficientnet-lite0", "image_size": 32, "multiscale": True})
    vision = model.backbone.vision
    adapted = _adapted_groups(vision)  # stem, 16 MBConv blocks, head
    assert adapted == [False] * 14 + [True] * 3 + [False]
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.tensor([[2, 5, 3], [2, 6, 3]]),
             "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    seen = _group_outputs_need_grad(model, batch)
    assert seen["vision"] == [False] * 14 + [True] * 4  # the frozen head above the adapters passes gradients on


def test_outputs_match_the_base_model_at_init(tiny_config, tiny_batch, tokenizer):
    batch = tiny_batch(tokenizer)
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(dropout=0.0)).eval()
    with torch.no_grad():
        base = model(**batch).logits
    for name, tower in towers(model).items():
        add_lora(tower, LoraSettings(rank=2, dropout=0.0, layers=1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, base, atol=0, rtol=0)  # lora_B starts at 0


@pytest.mark.parametrize("layers, match", [(-1, "--train.lora_text.layers=-1 must be"),
                                           (True, "--train.lora_text.layers=True must be"),
                                           ("2", "--train.lora_text.layers='2' must be")])
def test_invalid_layers_in_the_config(layers, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(text="lora", lora_text=LoraSettings(layers=layers))


def test_more_layers_than_the_tower_has(tiny_config):
    model = TwoTowerForQuestionAnswering(tiny_config())
    cfg = TrainConfig(vision="lora", text="frozen", lora_vision=LoraSettings(layers=3))
    with pytest.raises(ValueError, match=r"--train.lora_vision.layers=3: HFVisionTower has only 2 layers .* use 1..2"):
        apply_strategies(model, cfg)


def test_save_load_round_trip(tiny_config, tiny_batch, tokenizer, tmp_path):
    from peft import PeftModel

    batch = tiny_batch(tokenizer)
    model = _model(tiny_config, layers=1)
    with torch.no_grad():  # non-trivial adapters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.eval()
    unmerged = model(**batch).logits.detach()
    assert merge_lora(model, tmp_path / "adapters") == ["vision", "text"]
    config = json.loads((tmp_path / "adapters" / "text" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["encoder.layer.1.attention.self.query",
                                                "encoder.layer.1.attention.self.value"]
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = TwoTowerForQuestionAnswering.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(loaded(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)
    # the PEFT adapter alone, on a fresh base model, gives the same answers
    torch.manual_seed(0)
    fresh = TwoTowerForQuestionAnswering(tiny_config(dropout=0.0))
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if not name.startswith(("backbone.vision.", "backbone.text.")):
                p.copy_(dict(loaded.named_parameters())[name])
    for name, tower in towers(fresh).items():
        tower.model = PeftModel.from_pretrained(tower.model, tmp_path / "adapters" / name)
    torch.testing.assert_close(fresh.eval()(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_cli_trains_last_layer_lora_and_the_predictor_loads_it(tiny_model_args, tmp_path):
    from vqakit.cli import main
    from vqakit.inference.predict import VQAPredictor

    out = tmp_path / "run"
    main(["train", *tiny_model_args, "--data.dataset", "easy-vqa", "--data.limit", "24", "--train.epochs", "1",
          "--data.cache_dir", str(tmp_path / "cache"), "--train.batch_size", "8", "--train.progress", "false", "--train.logger", "none", "--evaluate", "false",
          "--train.vision", "lora", "--train.text", "lora", "--train.lora_text.layers", "1",
          "--train.lora_vision.layers", "2", "--train.out_dir", str(out)])
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["lora_text"]["layers"] == 1 and saved["lora_vision"]["layers"] == 2
    text = json.loads((out / "checkpoint" / "adapters" / "text" / "adapter_config.json").read_text())
    assert all(".layer.1." in t for t in text["target_modules"])
    predictor = VQAPredictor.from_pretrained(out / "checkpoint", backend="torch")
    answers = predictor.predict(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), "is there a circle?", top_k=2)
    assert len(answers) == 1 and len(answers[0].top_k) == 2
