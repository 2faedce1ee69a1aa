"""LoRA invariants (PEFT on the towers): what trains, base weights untouched, merging exact, adapter files."""

from __future__ import annotations

import pytest
import torch

from vqakit.models.two_tower import TwoTowerForQuestionAnswering
from vqakit.towers.text import load_tokenizer
from vqakit.train.config import LoraSettings, TrainConfig
from vqakit.train.recipes import add_lora, apply_strategies, merge_lora


@pytest.fixture
def tokenizer(tiny_text_tower):
    return load_tokenizer(tiny_text_tower)


def _lora_model(tiny_config, rank=4):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(dropout=0.0))
    cfg = TrainConfig(vision="lora", text="lora", lora_vision=LoraSettings(rank=rank, dropout=0.0),
                      lora_text=LoraSettings(rank=rank, dropout=0.0))
    counts = apply_strategies(model, cfg)
    return model, counts


def test_only_adapters_fusion_and_head_train(tiny_config):
    model, counts = _lora_model(tiny_config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    tower_trainable = [n for n in trainable if n.startswith("backbone.vision.") or n.startswith("backbone.text.")]
    assert tower_trainable and all("lora_" in n for n in tower_trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("backbone.fusion.") for n in trainable)
    assert 0 < counts["trainable"] < counts["total"]


def test_base_weights_unchanged_after_a_step(tiny_config, tiny_batch, tokenizer):
    model, _ = _lora_model(tiny_config)
    base = {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("backbone.") and "lora_" not in n and not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # lora_B starts at 0: the second step moves lora_A too
        model(**tiny_batch(tokenizer)).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA weights did not train"


def test_merge_is_exact_and_adapter_files_are_written(tiny_config, tiny_batch, tokenizer, tmp_path):
    model, _ = _lora_model(tiny_config)
    with torch.no_grad():  # make the adapters non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.eval()
    batch = tiny_batch(tokenizer)
    unmerged = model(**batch).logits
    merged_towers = merge_lora(model, tmp_path / "adapters")
    assert merged_towers == ["vision", "text"]
    torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)
    for tower in ("vision", "text"):
        assert {p.name for p in (tmp_path / "adapters" / tower).iterdir()} >= {
            "adapter_config.json", "adapter_model.safetensors"}
    # merged: a plain model again, so the checkpoint loads without PEFT
    assert not any("lora_" in n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = TwoTowerForQuestionAnswering.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_on_the_efficientnet_tower(tiny_config):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(vision={"name": "efficientnet-lite0", "image_size": 32}))
    add_lora(model.backbone.vision, LoraSettings(rank=2))
    names = [n for n, p in model.backbone.vision.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("_project_conv" in n for n in names) and any("_expand_conv" in n for n in names)
    out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.tensor([[2, 5, 3], [2, 6, 3]]),
                attention_mask=torch.ones(2, 3, dtype=torch.long))
    assert out.logits.shape == (2, 5)


def test_wrong_target_modules_name_the_real_ones(tiny_config):
    model = TwoTowerForQuestionAnswering(tiny_config())
    with pytest.raises(ValueError, match="query"):
        add_lora(model.backbone.text, LoraSettings(target_modules=["q_proj"]))


def test_optimizer_gives_each_part_its_learning_rate(tiny_config):
    from vqakit.train.system import VQASystem

    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config())
    cfg = TrainConfig(vision="full", text="lora", lr=1e-3, tower_lr=1e-5, lora_lr=3e-4)
    apply_strategies(model, cfg)
    optimizer = VQASystem(model, cfg, total_steps=10).configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in lr_of, name
        elif "lora_" in name:
            assert lr_of[id(p)] == 3e-4, name
        elif name.startswith("backbone.vision."):
            assert lr_of[id(p)] == 1e-5, name
        elif not name.startswith("backbone.text."):
            assert lr_of[id(p)] == 1e-3, name
