"""Size of the resumable Lightning checkpoint (``checkpoints/last.ckpt``) per strategy, with the default towers.

    python benchmarks/checkpoint_size.py [--config easy-vqa] [--strategies frozen,lora,partial,full]

Trains each strategy for 2 steps on 64 easy-VQA questions (``vqakit train`` in a subprocess), then
reports the checkpoint's size and the frozen tower weights it leaves out (``vqakit_frozen_tower_keys``,
restored from the pretrained towers on resume). Before frozen weights were left out, a checkpoint held
them too: ``size_with_frozen_mib`` adds their float32 bytes back. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FLAGS = {
    "frozen": ["--train.vision", "frozen", "--train.text", "frozen"],
    "lora": ["--train.vision", "lora", "--train.text", "lora"],
    "partial": ["--train.vision", "partial", "--train.text", "partial"],
    "full": ["--train.vision", "full", "--train.text", "full"],
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="easy-vqa")
    ap.add_argument("--strategies", default="frozen,lora,partial,full")
    ap.add_argument("--out", default="benchmarks/results/checkpoint_size.json")
    args = ap.parse_args(argv)
    results = {"config": args.config, "strategies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            run = Path(tmp) / name
            cmd = [sys.executable, "-m", "vqakit.cli", "train", "--config", args.config, *FLAGS[name],
                   "--data.limit", "64", "--data.cache_dir", str(Path(tmp) / "cache"), "--train.max_steps", "2",
                   "--train.batch_size", "32", "--train.out_dir", str(run), "--train.progress", "false",
                   "--evaluate", "false", "--train.logger", "none"]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            ckpt = run / "checkpoints" / "last.ckpt"
            state = torch.load(ckpt, weights_only=False, map_location="cpu")
            omitted = state.get("vqakit_frozen_tower_keys", [])
            meta = json.loads((run / "checkpoint" / "training_metadata.json").read_text())
            # fusion layers and head always train: every frozen parameter is a tower weight
            left_out = meta["parameters"]["total"] - meta["parameters"]["trainable"] if omitted else 0
            size = ckpt.stat().st_size / 2**20
            results["strategies"][name] = {
                "last_ckpt_mib": round(size, 1),
                "frozen_tower_tensors_left_out": len(omitted),
                "frozen_parameters_left_out": left_out,
                "size_with_frozen_mib": round(size + 4 * left_out / 2**20, 1),
                "trainable_parameters": meta["parameters"]["trainable"],
            }
            print(name, results["strategies"][name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
