"""Time of one training step (forward, backward, AdamW step) of the default easy-VQA model, per strategy.

    nice -n 5 python benchmarks/lora_step_time.py [--config easy-vqa] [--batch_size 64] [--steps 8]

A closer look at ``benchmarks/compare_lora_full.py``'s time ratio without data loading, validation or
checkpoint writing: the model of ``--config`` with its pretrained towers, on a synthetic batch (random
64 px images, easy-VQA-style questions through the real tokenizer), under ``full``, ``lora`` with the
config's ``train.lora_*`` settings (adapters on the last layers only) and ``lora`` with adapters on every
layer (``layers 0``, what ``lora`` was before). Reports the median wall-clock and CPU (process) time per
step and their ratio to ``full``. CPU time is less sensitive to other processes on a shared machine than
wall-clock time, so both are written, with the load average, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from vqakit.configs import resolve_config

QUESTIONS = ["what is the color of the shape?", "what shape is in the image?", "is there a red shape?",
             "does the image contain a circle?", "is the shape blue?", "what color is the triangle?"]


def step_times(strategy: str, lora_layers: dict | None, model_cfg, train_cfg, batch: dict, steps: int) -> dict:
    from vqakit.models.two_tower import TwoTowerForQuestionAnswering
    from vqakit.train.recipes import apply_strategies

    torch.manual_seed(0)
    net = TwoTowerForQuestionAnswering(model_cfg, pretrained_towers=True)
    cfg = replace(train_cfg, vision=strategy, text=strategy)
    if lora_layers is not None:
        cfg.lora_vision = replace(cfg.lora_vision, layers=lora_layers["vision"])
        cfg.lora_text = replace(cfg.lora_text, layers=lora_layers["text"])
    params = apply_strategies(net, cfg)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    wall, cpu = [], []
    for i in range(steps + 2):  # 2 warm-up steps
        w, c = time.perf_counter(), time.process_time()
        net(**batch).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    return {"trainable_parameters": params["trainable"], "lora_layers": lora_layers,
            "wall_s_per_step": round(statistics.median(wall), 4), "cpu_s_per_step": round(statistics.median(cpu), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="easy-vqa")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/lora_step_time.json")
    args = ap.parse_args(argv)

    from vqakit.models.two_tower import TwoTowerConfig
    from vqakit.towers.text import load_tokenizer
    from vqakit.train.config import TrainConfig

    raw = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    model_cfg = TwoTowerConfig(**TwoTowerConfig.upgrade_keys(raw["model"]),
                               id2label={i: str(i) for i in range(13)})  # easy-VQA: 13 answers
    train_cfg = TrainConfig(**raw.get("train", {}))
    g = torch.Generator().manual_seed(0)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch_size)]
    enc = load_tokenizer(model_cfg.text.name)(questions, padding=True, return_tensors="pt")
    size = model_cfg.vision.image_size
    batch = {"pixel_values": torch.randn(args.batch_size, 3, size, size, generator=g),
             "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    load_before = os.getloadavg()
    config_layers = {"vision": train_cfg.lora_vision.layers, "text": train_cfg.lora_text.layers}
    runs = {
        "full": step_times("full", None, model_cfg, train_cfg, batch, args.steps),
        "lora": step_times("lora", config_layers, model_cfg, train_cfg, batch, args.steps),
        "lora_every_layer": step_times("lora", {"vision": 0, "text": 0}, model_cfg, train_cfg, batch, args.steps),
    }
    for r in runs.values():
        r["wall_ratio_to_full"] = round(r["wall_s_per_step"] / runs["full"]["wall_s_per_step"], 3)
        r["cpu_ratio_to_full"] = round(r["cpu_s_per_step"] / runs["full"]["cpu_s_per_step"], 3)
    result = {"command": f"python benchmarks/lora_step_time.py --config {args.config} --batch_size "
                         f"{args.batch_size} --steps {args.steps}",
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], **runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
