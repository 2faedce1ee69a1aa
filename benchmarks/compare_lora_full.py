"""Issue 3's LoRA targets, measured: ``vqakit compare --strategies full,lora`` on an easy-VQA subset.

    nice -n 5 python benchmarks/compare_lora_full.py

(the defaults: ``--config easy-vqa --limit 4000 --epochs 8 --batch_size 64``; with 3 epochs LoRA
has not caught up with full fine-tuning yet: README, "LoRA on the last layers").

Targets: LoRA trains <= 2% of the parameters, takes <= 0.6x the full fine-tune's time to train and loses
<= 0.5 points of test VQA accuracy; the whole comparison finishes in <= 30 minutes on 2 cores. The subset
is ``--limit`` questions per split (``--data.limit``: about 4,000 training and 4,000 test questions, whole
images in seeded random order); both strategies get the same data, seed, epochs and batch size. LoRA's
settings come from the config: in ``easy-vqa`` rank 8 on the last 5 EfficientNet blocks and
the last 2 MiniLM layers (``train.lora_vision.layers`` / ``train.lora_text.layers``), so its backward pass
stops there; the full fine-tune trains every weight at ``train.tower_lr`` as before.
Reports LoRA's trainable share both with the fusion layers and head (which every strategy trains) and for
the adapters alone, plus the load average before and after, since timings on a shared machine vary.
Writes JSON to ``--out``; rerunning with the same ``--out_dir`` reuses finished strategies (delete it to
measure again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def adapter_parameters(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in (checkpoint / "adapters").glob("*/adapter_model.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="easy-vqa")
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--out_dir", default="runs/bench-compare-lora-full")
    ap.add_argument("--out", default="benchmarks/results/compare_lora_full.json")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    cmd = [sys.executable, "-m", "vqakit.cli", "compare", "--config", args.config, "--data.limit", str(args.limit),
           "--train.epochs", str(args.epochs), "--train.batch_size", str(args.batch_size),
           "--strategies", "full,lora", "--out_dir", args.out_dir]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    rows = {r["strategy"]: r for r in json.loads((Path(args.out_dir) / "comparison.json").read_text())}
    full, lora = rows["full"], rows["lora"]
    adapters = adapter_parameters(Path(lora["run_dirs"][-1]) / "checkpoint")
    import yaml

    lora_train = yaml.safe_load((Path(lora["run_dirs"][-1]) / "config.yaml").read_text())["train"]
    ratio = lora["time_to_train_s"] / full["time_to_train_s"]
    loss = full["vqa_accuracy"] - lora["vqa_accuracy"]
    result = {
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "full": {k: full[k] for k in ("time_to_train_s", "trainable_parameters", "total_parameters", "vqa_accuracy")},
        "lora": {k: lora[k] for k in ("time_to_train_s", "trainable_parameters", "total_parameters", "vqa_accuracy")},
        "lora_settings": {k: lora_train[k] for k in ("lora_vision", "lora_text", "lora_lr", "lr", "tower_lr")},
        "lora_trainable_percent_with_fusion_and_head": lora["trainable_percent"],
        "lora_adapter_parameters": adapters,
        "lora_adapter_percent": round(100 * adapters / lora["total_parameters"], 2),
        "time_ratio_lora_over_full": round(ratio, 3),
        "accuracy_loss_points": round(loss, 2),
        "targets": {
            "adapters_le_2_percent": 100 * adapters / lora["total_parameters"] <= 2.0,
            "all_trainable_le_2_percent": lora["trainable_percent"] <= 2.0,
            "time_ratio_le_0.6": ratio <= 0.6,
            "accuracy_loss_le_0.5": loss <= 0.5,
            "wall_le_30_min": wall <= 1800,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
