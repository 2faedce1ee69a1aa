"""GPU-only options: QLoRA (4-bit NF4 base + LoRA), 8-bit AdamW, fp16/bf16 AMP. On CPU: the config is
validated and the run fails early with a clear error (or falls back, for 16-mixed); the CUDA tests skip,
saying why, where there is no GPU or no bitsandbytes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from vqakit.cli import main
from vqakit.train.config import TrainConfig
from vqakit.train.recipes import check_device_support

CUDA = torch.cuda.is_available()
BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here)")
needs_bnb = pytest.mark.skipif(not (CUDA and BNB),
                               reason="needs a CUDA GPU and bitsandbytes (pip install 'vqakit[gpu]')")


def test_options_are_validated():
    assert TrainConfig(vision="qlora", text="qlora", optimizer="adamw8bit", precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"--train.precision='fp8' is not one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"--train.optimizer='sgd' is not one of \('adamw', 'adamw8bit'\)"):
        TrainConfig(optimizer="sgd")


@pytest.mark.parametrize("overrides, named", [
    ({"text": "qlora"}, "QLoRA"), ({"optimizer": "adamw8bit"}, "8-bit AdamW"), ({"precision": "16-true"}, "fp16"),
    ({"strategy": "fsdp", "devices": 2}, "FSDP"),
])  # fmt: skip
def test_gpu_only_options_fail_early_on_cpu(overrides, named):
    with pytest.raises(RuntimeError, match=f"{named}.* need a CUDA GPU, and this run is on CPU"):
        check_device_support(TrainConfig(**overrides), cuda=False)


def test_cpu_precision_fallbacks():
    assert check_device_support(TrainConfig(precision="16-mixed"), cuda=False) == "bf16-mixed"
    assert check_device_support(TrainConfig(precision="bf16-mixed"), cuda=False) == "bf16-mixed"
    assert check_device_support(TrainConfig(precision="16-mixed"), cuda=True) == "16-mixed"


@pytest.mark.skipif(BNB, reason="bitsandbytes is installed")
def test_missing_bitsandbytes_is_named():
    with pytest.raises(RuntimeError, match=r"pip install 'vqakit\[gpu\]'"):
        check_device_support(TrainConfig(optimizer="adamw8bit"), cuda=True)


def test_cli_error_before_loading_anything(tiny_model_args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *tiny_model_args, "--train.vision", "qlora", "--train.accelerator", "cpu",
              "--train.out_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "vqakit: error: QLoRA (--train.vision/--train.text qlora) need a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bf16_mixed_trains_on_cpu(tiny_model_args, tmp_path):
    run = tmp_path / "run"
    main(["train", *tiny_model_args, "--data.limit", "16", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(run), "--train.epochs", "1", "--train.batch_size", "8", "--train.text", "lora",
          "--train.precision", "bf16-mixed", "--train.accelerator", "cpu", "--train.progress", "false",
          "--evaluate", "false", "--train.logger", "none"])  # fmt: skip
    meta = json.loads((run / "checkpoint" / "training_metadata.json").read_text())
    assert meta["precision"] == "bf16-mixed" and meta["steps"] == -(-meta["num_train_questions"] // 8) > 0


@needs_bnb
def test_qlora_quantizes_trains_adapters_and_saves_float_weights(tiny_config, tiny_batch, tiny_text_tower, tmp_path):
    import bitsandbytes as bnb

    from vqakit.models.two_tower import TwoTowerForQuestionAnswering
    from vqakit.towers.text import load_tokenizer
    from vqakit.train.recipes import apply_strategies, merge_lora

    torch.manual_seed(0)
    net = TwoTowerForQuestionAnswering(tiny_config())
    apply_strategies(net, TrainConfig(vision="qlora", text="qlora"))
    net = net.cuda()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in net.backbone.text.modules())
    batch = {k: v.cuda() for k, v in tiny_batch(load_tokenizer(tiny_text_tower)).items()}
    net(**batch).logits.float().sum().backward()
    tower_grads = [n for n, p in net.backbone.named_parameters()
                   if p.grad is not None and n.startswith(("vision.", "text."))]
    assert tower_grads and all("lora_" in n for n in tower_grads)
    with torch.no_grad():
        before = net.eval()(**batch).logits.float()
    merge_lora(net, tmp_path / "adapters")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in net.modules())
    with torch.no_grad():  # the merged float model computes what the 4-bit + adapter model did (to 4-bit rounding)
        torch.testing.assert_close(net.float()(**batch).logits, before, atol=5e-2, rtol=5e-2)
    net.cpu().save_pretrained(tmp_path / "ckpt")
    TwoTowerForQuestionAnswering.from_pretrained(tmp_path / "ckpt")


@needs_bnb
def test_adamw8bit_and_fp16_train_on_cuda(tiny_model_args, tmp_path):
    run = tmp_path / "run"
    main(["train", *tiny_model_args, "--data.limit", "16", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(run), "--train.epochs", "1", "--train.batch_size", "8", "--train.text", "qlora",
          "--train.optimizer", "adamw8bit", "--train.precision", "16-mixed", "--train.accelerator", "gpu",
          "--train.progress", "false", "--train.logger", "none"])  # fmt: skip
    meta = json.loads((run / "checkpoint" / "training_metadata.json").read_text())
    assert meta["precision"] == "16-mixed" and meta["optimizer"] == "adamw8bit" and meta["steps"] > 0
    assert (run / "checkpoint" / "adapters" / "text" / "adapter_config.json").is_file()


@needs_cuda
def test_bf16_amp_on_cuda(tiny_model_args, tmp_path):
    run = tmp_path / "run"
    main(["train", *tiny_model_args, "--data.limit", "16", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(run), "--train.epochs", "1", "--train.batch_size", "8", "--train.text", "full",
          "--train.precision", "bf16-mixed", "--train.accelerator", "gpu", "--train.progress", "false",
          "--evaluate", "false", "--train.logger", "none"])  # fmt: skip
    assert json.loads((run / "checkpoint" / "training_metadata.json").read_text())["precision"] == "bf16-mixed"


@needs_cuda
def test_fsdp_on_cuda(tiny_model_args, tmp_path):
    run = tmp_path / "run"
    main(["train", *tiny_model_args, "--data.limit", "16", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(run), "--train.epochs", "1", "--train.batch_size", "8", "--train.text", "full",
          "--train.strategy", "fsdp", "--train.devices", "1", "--train.accelerator", "gpu",
          "--train.progress", "false", "--evaluate", "false", "--train.logger", "none"])  # fmt: skip
    assert (run / "checkpoint" / "model.safetensors").is_file()
