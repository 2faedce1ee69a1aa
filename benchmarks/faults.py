"""Fault injection: damage vqakit's own state for real and check each fault is detected and repaired (or refused
with an error naming the file). Writes ``benchmarks/results/faults.json``.

    python benchmarks/faults.py [--out benchmarks/results/faults.json]

Runs on a tiny random-weight checkpoint built here (2-layer, 32-wide ViT and BERT) and 64 easy-VQA test
questions, so it takes about a minute on a quiet CPU:

- feature cache: one shard of the image-feature cache truncated to half, a flipped byte, a deleted file, an
  index that disagrees with its arrays, an unreadable index, a truncated shard of an old (format-1) cache.
  After each, ``evaluate`` must name the shard, re-encode it, and give the same metrics as with a clean cache.
- checkpoint directory: ``model.safetensors`` truncated, ``config.json`` overwritten with bytes: one error naming
  the file.
- training checkpoints: a truncated ``last.ckpt`` (resume falls back to ``last.prev.ckpt``); a write onto a full
  device (``/dev/full``) and onto a full 2 MB tmpfs (where mounting is allowed): the previous checkpoint stays.
- numerical: a NaN loss (lr 1e30) stops the run naming the step and question ids; with ``skip``, it is counted.
- evaluation: SIGKILL mid-``evaluate``; the rerun resumes and scores the same as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMINGS = ("predict_seconds", "questions_per_second", "resumed_questions", "out_dir")


def _soak_module():
    spec = importlib.util.spec_from_file_location("vqakit_soak_benchmark", HERE / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def cache_faults(checkpoint: Path, root: Path, warnings: _Warnings) -> list[dict]:
    from vqakit.data.cache import FeatureCache
    from vqakit.data.config import DataConfig
    from vqakit.eval.evaluate import evaluate_checkpoint

    data = DataConfig(limit=64, cache_dir=str(root / "cache"))
    clean = _scores(evaluate_checkpoint(checkpoint, data, out_dir=root / "eval", batch_size=16, progress=False))
    features = root / "cache" / "features"

    def image_shard(field="tokens"):
        ns = next(p for p in features.iterdir() if p.name.startswith("vision-"))
        return ns, ns / f"shard-00000.{field}.npy"

    def truncate(path):
        os.truncate(path, path.stat().st_size // 2)

    def flip(path):
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))

    def disagree(path):
        keys = path.with_name("shard-00000.keys.json")
        index = json.loads(keys.read_text())
        index["keys"] = index["keys"][:-1]
        keys.write_text(json.dumps(index))

    def legacy_truncated(path):
        for keys in path.parent.glob("*.keys.json"):
            keys.write_text(json.dumps(json.loads(keys.read_text())["keys"]))
        truncate(path)

    faults = {
        "cache shard truncated to half": truncate,
        "cache shard byte flipped": flip,
        "cache shard file deleted": lambda p: p.unlink(),
        "cache index disagrees with its shard": disagree,
        "cache index unreadable": lambda p: p.with_name("shard-00000.keys.json").write_bytes(b"\x00garbage"),
        "format-1 cache shard truncated (the issue's case)": legacy_truncated,
    }
    results = []
    for name, damage in faults.items():
        ns, path = image_shard()
        damage(path)
        warnings.lines.clear()
        try:
            metrics = _scores(evaluate_checkpoint(checkpoint, data, out_dir=root / "eval", batch_size=16,
                                                  progress=False))
            error = None
        except Exception as e:  # a fault that is not handled is a failed check, recorded
            metrics, error = None, f"{type(e).__name__}: {e}"
        reported = [w for w in warnings.lines if "damaged shard" in w]
        results.append({"fault": name, "detected": bool(reported) and str(ns) in reported[0],
                        "message": reported[0] if reported else error,
                        "repaired": error is None and FeatureCache(features, ns.name).problems == [],
                        "same_metrics_as_clean_cache": metrics == clean})
    return results


def checkpoint_dir_faults(checkpoint: Path, root: Path) -> list[dict]:
    import shutil

    from vqakit.inference.generative import load_predictor

    results = []
    for name, file, damage in (
        ("model.safetensors truncated", "model.safetensors", lambda p: os.truncate(p, p.stat().st_size // 2)),
        ("config.json overwritten with bytes", "config.json", lambda p: p.write_bytes(os.urandom(64))),
    ):
        copy = root / f"ckpt-{file}"
        shutil.copytree(checkpoint, copy)
        damage(copy / file)
        try:
            load_predictor(copy, backend="torch")
            message = None
        except (ValueError, FileNotFoundError) as e:
            message = str(e)
        results.append({"fault": name, "detected": message is not None and str(copy / file) in message,
                        "message": message, "repaired": "refused with an error naming the file (not repairable)"})
    return results


def training_checkpoint_faults(root: Path, warnings: _Warnings) -> list[dict]:
    import torch

    from vqakit.train.checkpointing import AtomicCheckpointIO, CheckpointWriteError, resume_checkpoint

    io = AtomicCheckpointIO()
    results = []
    ckpts = root / "checkpoints"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, ckpts / "last.ckpt")
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, ckpts / "last.ckpt")
    os.truncate(ckpts / "last.ckpt", (ckpts / "last.ckpt").stat().st_size // 2)
    warnings.lines.clear()
    chosen = resume_checkpoint(ckpts)
    results.append({"fault": "last.ckpt truncated", "detected": any("last.ckpt cannot be loaded" in w
                                                                    for w in warnings.lines),
                    "message": " / ".join(warnings.lines),
                    "repaired": chosen == ckpts / "last.prev.ckpt"
                    and torch.load(chosen, weights_only=True)["global_step"] == 1})

    def full_write(name, folder, redirect):
        path = folder / "last.ckpt"
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
        redirect(path)
        try:
            io.save_checkpoint({"state_dict": {"w": torch.zeros(4 << 20)}, "global_step": 2}, path)
            message = None
        except CheckpointWriteError as e:
            message = str(e)
        intact = torch.load(path, weights_only=True)["global_step"] == 1
        results.append({"fault": name, "detected": message is not None and str(path) in message, "message": message,
                        "repaired": intact and not (folder / ".last.ckpt.tmp").exists()})

    devfull = root / "devfull"
    devfull.mkdir()
    full_write("checkpoint write onto /dev/full (ENOSPC)", devfull,
               lambda p: (p.parent / ".last.ckpt.tmp").symlink_to("/dev/full"))
    mnt = root / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        results.append({"fault": "checkpoint write onto a full 2 MB tmpfs", "skipped": "mounting not allowed"})
    else:
        try:
            full_write("checkpoint write onto a full 2 MB tmpfs (ENOSPC)", mnt, lambda p: None)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    return results


def nan_faults(towers: Path, root: Path) -> list[dict]:
    from vqakit.cli import main

    args = ["train", "--model.vision.name", str(towers / "vit"), "--model.text.name", str(towers / "bert"),
            "--model.vision.image_size", "32", "--model.hidden_size", "32", "--model.num_heads", "4",
            "--model.num_fusion_layers", "1", "--data.limit", "32", "--data.cache_dir", str(root / "cache"),
            "--train.epochs", "1", "--train.batch_size", "4", "--train.progress", "false", "--evaluate", "false",
            "--train.logger", "none", "--train.lr", "1e30", "--train.warmup_ratio", "0", "--train.grad_clip", "0"]
    results = []
    try:
        main([*args, "--train.out_dir", str(root / "nan-stop")])
        message = None
    except SystemExit as e:
        message = str(e.__cause__)
    results.append({"fault": "NaN loss (lr 1e30), on_nonfinite_loss=stop",
                    "detected": message is not None and "training loss is nan at step" in message
                    and "question ids" in message, "message": message,
                    "repaired": "stopped at once, before the optimizer step"})
    main([*args, "--train.out_dir", str(root / "nan-skip"), "--train.on_nonfinite_loss", "skip"])
    meta = json.loads((root / "nan-skip" / "checkpoint" / "training_metadata.json").read_text())
    results.append({"fault": "NaN loss (lr 1e30), on_nonfinite_loss=skip",
                    "detected": meta["skipped_nonfinite_batches"] > 0,
                    "message": f"skipped_nonfinite_batches={meta['skipped_nonfinite_batches']} of "
                               f"{meta['steps'] + meta['skipped_nonfinite_batches']} batches",
                    "repaired": "batches skipped and counted; the run finished"})
    return results


def eval_kill_fault(checkpoint: Path, root: Path) -> list[dict]:
    from vqakit.data.config import DataConfig
    from vqakit.eval.evaluate import evaluate_checkpoint
    from vqakit.eval.journal import JOURNAL_NAME

    data = DataConfig(limit=160, cache_dir=str(root / "cache"))
    child = ("import sys\nfrom vqakit.data.config import DataConfig\nfrom vqakit.eval.evaluate import evaluate_checkpoint\n"
             "evaluate_checkpoint(sys.argv[1], DataConfig(limit=160, cache_dir=sys.argv[3]), out_dir=sys.argv[2], "
             "batch_size=8, progress=False, journal_every=8)\n")
    killed = root / "eval-killed"
    proc = subprocess.Popen([sys.executable, "-c", child, str(checkpoint), str(killed), data.cache_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = killed / JOURNAL_NAME
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if journal.is_file() and journal.read_bytes().count(b"\n") > 1 + 3 * 8:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = evaluate_checkpoint(checkpoint, data, out_dir=killed, batch_size=8, progress=False, journal_every=8)
    fresh = evaluate_checkpoint(checkpoint, data, out_dir=root / "eval-fresh", batch_size=8, progress=False)
    return [{"fault": "evaluate SIGKILLed mid-split", "detected": proc.returncode == -signal.SIGKILL
             and resumed["resumed_questions"] > 0,
             "message": f"resumed {resumed['resumed_questions']} of {resumed['num_questions']} questions",
             "repaired": _scores(resumed) == _scores(fresh)
             and (killed / "predictions.csv").read_text() == (root / "eval-fresh" / "predictions.csv").read_text()}]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/faults.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings = _Warnings()
    logging.getLogger("vqakit").addHandler(warnings)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = _soak_module().tiny_checkpoint(root / "tiny")
        faults = [*cache_faults(checkpoint, root / "c", warnings), *checkpoint_dir_faults(checkpoint, root),
                  *training_checkpoint_faults(root / "t", warnings), *nan_faults(root / "tiny", root / "n"),
                  *eval_kill_fault(checkpoint, root / "e")]
    tried = [f for f in faults if "skipped" not in f]
    result = {"benchmark": "faults", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
              "command": "python benchmarks/faults.py", "seconds": round(time.time() - started, 1),
              "tried": len(tried), "detected": sum(f["detected"] is True for f in tried),
              "repaired_or_refused": sum(f["repaired"] not in (False, None) for f in tried),
              "skipped": [f for f in faults if "skipped" in f], "faults": tried,
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tried", "detected", "repaired_or_refused", "seconds")}))
    for f in tried:
        print(f"{'ok ' if f['detected'] and f['repaired'] else 'FAIL'}  {f['fault']}")
    return result


if __name__ == "__main__":
    main()
