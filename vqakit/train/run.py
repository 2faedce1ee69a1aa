"""One training run, end to end: data -> vocab -> model -> caches -> Lightning fit -> checkpoint -> evaluation.

The run directory ``train.out_dir`` ends up with::

    config.yaml            the resolved configuration (model, data, train)
    logs/                  CSV / TensorBoard metrics
    checkpoint/            config.json, model.safetensors, answer_vocab.json, text_tower/ (tokenizer),
                           training_metadata.json, adapters/<tower>/ (LoRA runs)
                           README.md (the model card, Hugging Face format)
    checkpoint/eval-<dataset>-<split>/  metrics.json, predictions.csv, failures.json, results.json
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import platform
import resource
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import yaml

from vqakit.data.answers import AnswerVocab
from vqakit.data.config import DataConfig, fingerprint, load_split, split_validation
from vqakit.data.images import filter_examples, scan_images
from vqakit.models.two_tower import TwoTowerConfig, TwoTowerForQuestionAnswering
from vqakit.towers.processor import VQAProcessor
from vqakit.train.checkpointing import AtomicCheckpointIO, ResumeState, resume_checkpoint
from vqakit.train.config import TrainConfig
from vqakit.train.datamodule import VQADataModule, VQADataset
from vqakit.train.plan import PlanTimer, make_plan
from vqakit.train.recipes import apply_strategies, check_device_support, merge_lora
from vqakit.train.system import VQASystem, validation_groups
from vqakit.train.tracking import check_trackers, log_evaluation, log_run_start, make_loggers

logger = logging.getLogger("vqakit")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load_train_examples(data: DataConfig, progress: bool):
    examples = load_split(data, data.train_split)
    skipped = []
    if data.scan_images and any(isinstance(e.image, list) for e in examples):
        # several images per question: scan every distinct path, drop the questions with a broken one
        paths = list(dict.fromkeys(p for e in examples for p in (e.image if isinstance(e.image, list) else [e.image])))
        report = scan_images(dict(enumerate(paths)), progress=progress)
        bad = {path for _, path, _ in report.bad}
        skipped = sorted({e.image_id for e in examples
                          if bad & set(e.image if isinstance(e.image, list) else [e.image])})
        examples = [e for e in examples if e.image_id not in skipped]
        if skipped:
            logger.warning("skipped the questions of %d image sets with broken images: %s", len(skipped), sorted(bad))
    elif data.scan_images:
        report = scan_images({e.image_id: e.image for e in examples}, progress=progress)
        examples = filter_examples(examples, report)
        skipped = [b[0] for b in report.bad]
    if not examples:
        raise ValueError(f"no training examples left in {data.dataset} split {data.train_split!r}")
    return examples, skipped


def _dataset(examples, vocab, model, processor, train: TrainConfig, data: DataConfig) -> VQADataset:
    from vqakit.data.features import cache_image_features, cache_text_features

    root = None if data.cache_dir is None else Path(data.cache_dir) / "features"
    kwargs = {}
    if train.vision == "frozen":
        kwargs["image_cache"], kwargs["image_keys"] = cache_image_features(
            model, processor, [e.image for e in examples], root, progress=train.progress
        )
    if train.text == "frozen":
        kwargs["text_cache"], kwargs["text_keys"] = cache_text_features(
            model, processor, [e.question for e in examples], root, progress=train.progress
        )
    return VQADataset(examples, vocab, processor, **kwargs)


def _init_from(net: TwoTowerForQuestionAnswering, checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``net`` (same architecture and answer vocabulary)."""
    from safetensors.torch import load_file

    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--train.init_from={checkpoint}: {config_path} not found")
    theirs = TwoTowerConfig.from_dict(json.loads(config_path.read_text()))
    if theirs.id2label != net.config.id2label:
        raise ValueError(f"--train.init_from={checkpoint} has another answer vocabulary "
                         f"({len(theirs.id2label)} answers vs {len(net.config.id2label)}): train it on the same data")
    missing, unexpected = net.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(f"--train.init_from={checkpoint} does not match this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def _checkpoint_callbacks(train: TrainConfig, out: Path, val_set) -> list:
    """``last.ckpt`` at every epoch end and every ``checkpoint_every_n_examples``; ``best.ckpt`` by validation."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = -(-train.checkpoint_every_n_examples // train.batch_size) if train.checkpoint_every_n_examples else None
    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True,
                                 every_n_train_steps=every, save_on_train_epoch_end=True)]
    if val_set:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/vqa_score",
                                         mode="max", save_top_k=1, enable_version_counter=False))
    return callbacks


def _trainer(train: TrainConfig, out: Path, callbacks: list, precision: str, plan=None) -> L.Trainer:
    """The Lightning trainer of every run (classifier and generative): loggers, clipping, atomic checkpoints."""
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen towers are, on purpose
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # inside Lightning
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*")  # inside torchdata
    return L.Trainer(
        max_epochs=plan.max_epochs if plan is not None else train.epochs,
        max_steps=plan.steps if plan is not None else train.max_steps, precision=precision,
        # every n steps counted over the whole run (check_val_every_n_epoch=None), not within each epoch
        val_check_interval=train.val_every_n_steps or None,
        check_val_every_n_epoch=None if train.val_every_n_steps else 1,
        accelerator=train.accelerator, devices=train.devices, strategy=train.strategy, num_nodes=train.num_nodes,
        logger=make_loggers(train, out) or False, gradient_clip_val=train.grad_clip or None, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], enable_progress_bar=train.progress, enable_model_summary=False,
        log_every_n_steps=10, num_sanity_val_steps=0, default_root_dir=out,
    )  # fmt: skip


@contextlib.contextmanager
def flush_denormal(on: bool):
    """Treat CPU float32 denormals as zero inside the block (``TrainConfig.flush_denormal``), on the calling thread
    and on PyTorch's OpenMP threads, then restore the default. A CPU that cannot flush them gets one log line and
    runs as before."""
    enabled = bool(on) and set_flush_denormal(True)
    if on and not enabled:
        logger.info("this CPU cannot flush denormal floats to zero; training runs without it")
    try:
        yield enabled
    finally:
        if enabled:
            set_flush_denormal(False)


def set_flush_denormal(on: bool) -> bool:
    """``torch.set_flush_denormal`` sets the mode of the calling thread only, and the threads of PyTorch's
    intra-op pool keep theirs: with two threads half of every parallel op still ran on denormals. So the mode is
    also set inside one OpenMP parallel region of the pool's size, on each of its threads (libgomp reuses the
    same threads for PyTorch's regions). Where PyTorch's OpenMP runtime is not libgomp the other threads keep
    their mode. Returns whether the CPU supports it."""
    if not torch.set_flush_denormal(on):
        return False
    threads = torch.get_num_threads()
    if threads > 1 and "OpenMP" in torch.__config__.parallel_info():
        libtorch = _loaded_library("libtorch_cpu")
        if libtorch is not None:
            import ctypes

            # looked up through libtorch_cpu, so the OpenMP runtime it links, not another copy in the process
            # (scikit-learn ships its own libgomp)
            parallel = getattr(ctypes.CDLL(libtorch), "GOMP_parallel", None)
            if parallel is not None:
                callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
                callback = callback_type(lambda _: torch.set_flush_denormal(on))
                parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                parallel(callback, None, threads, 0)
    return True


def _loaded_library(name: str) -> str | None:
    """The path of a shared library this process has loaded whose file name starts with ``name`` (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if f"/{name}" in line}
    except OSError:
        return None
    return min(paths) if paths else None


def flushing_denormals(fit_fn):
    """Run a ``fit(model, data, train, ...)`` function under ``flush_denormal(train.flush_denormal)``."""

    @functools.wraps(fit_fn)
    def wrapper(model, data, train, *args, **kwargs):
        with flush_denormal(train.flush_denormal):
            return fit_fn(model, data, train, *args, **kwargs)

    return wrapper


def run_metadata(trainer: L.Trainer, resume_state: ResumeState, train: TrainConfig, params: dict,
                 train_examples: list, val_examples: list, skipped: list) -> dict:
    """What every run records in ``training_metadata.json``: cost, sizes, data and versions."""
    seconds = resume_state.seconds
    return {
        "time_to_train_s": round(seconds, 2),
        "epoch_seconds": resume_state.epoch_seconds,
        "resumed_from_step": resume_state.resumed_from_step,
        "init_from": train.init_from,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "examples_per_s": round(trainer.global_step * train.batch_size / max(seconds, 1e-9), 1),
        "parameters": params,
        "strategies": {"vision": train.vision, "text": train.text},
        "num_train_questions": len(train_examples),
        "num_val_questions": len(val_examples),
        "skipped_images": skipped,
        "data_fingerprint": fingerprint(train_examples),
        "validation": {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "flush_denormal": train.flush_denormal,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }


def training_plan(train: TrainConfig, plan, params: dict, train_examples: list, val_examples: list,
                  num_answers: int) -> dict:
    """What the run is about to do (``vqakit.train.plan``), logged to the trackers before the first step."""
    return {**plan.to_dict(), "total_steps": plan.steps, "num_train_questions": len(train_examples),
            "num_val_questions": len(val_examples), "trainable_parameters": params["trainable"],
            "total_parameters": params["total"], "answers": num_answers,
            "strategies": {"vision": train.vision, "text": train.text}}


def start_tracking(trainer: L.Trainer, resolved: dict, plan: dict) -> None:
    if trainer.is_global_zero:
        log_run_start(trainer.loggers, resolved, plan)


def finish_run(out: Path, ckpt: Path, metadata: dict, data: DataConfig, train: TrainConfig, evaluate: bool,
               trainer: L.Trainer | None = None) -> dict:
    """Write ``training_metadata.json`` and the model card; evaluate the checkpoint on ``data.eval_split`` when
    asked (which refreshes the card); send the evaluation to the trackers."""
    from vqakit.inference.model_card import write_model_card

    (ckpt / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    write_model_card(ckpt)
    summary = {"run_dir": str(out), "checkpoint": str(ckpt), **metadata}
    if evaluate:
        from vqakit.eval.evaluate import evaluate_checkpoint

        summary["metrics"] = evaluate_checkpoint(ckpt, data, batch_size=train.eval_batch_size,
                                                 progress=train.progress)
    if trainer is not None:
        m = summary.get("metrics") or {}
        files = [ckpt / "README.md", ckpt / "training_metadata.json", out / "config.yaml"]
        if m.get("out_dir"):
            files += [Path(m["out_dir"]) / "metrics.json", Path(m["out_dir"]) / "results.json"]
        log_evaluation(trainer.loggers, {**m, "time_to_train_s": metadata.get("time_to_train_s", 0.0)},
                       trainer.global_step, files)
    return summary


@flushing_denormals
def fit(model: TwoTowerConfig, data: DataConfig, train: TrainConfig, evaluate: bool = True,
        command: str | None = None, callbacks: list | None = None) -> dict:
    """Train a model as configured; returns a summary (paths, time to train, metrics). ``command``: the command
    line that started the run, recorded in ``training_metadata.json`` and the model card. ``callbacks``: more
    Lightning callbacks for the trainer, e.g. the reporter of a ``vqakit tune`` trial."""
    precision = check_device_support(train)  # GPU-only options fail here, before anything loads
    check_trackers(train)  # an unreachable tracking server too
    out = Path(train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"model": asdict(model), "data": asdict(data), "train": asdict(train)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    L.seed_everything(train.seed, workers=True, verbose=False)

    examples, skipped = _load_train_examples(data, train.progress)
    from vqakit.data.example import require_single_image

    require_single_image(examples, "the two-tower classifier")
    if data.train_image_fraction < 1.0:  # record exactly which images the sample kept
        sample = {"dataset": data.dataset, "split": data.train_split, "fraction": data.train_image_fraction,
                  "seed": data.seed, "image_ids": sorted({e.image_id for e in examples})}
        (out / "sampled_images.json").write_text(json.dumps(sample) + "\n")
    train_examples, val_examples = split_validation(examples, data.val_fraction, data.seed)
    vocab = AnswerVocab.build([e.answers for e in train_examples], top_k=data.top_k_answers)
    model.id2label = vocab.id2label
    logger.info("answer vocabulary: %d answers, covering %.2f%% of training questions",
                len(vocab), 100 * vocab.coverage([e.answers for e in train_examples]))

    net = TwoTowerForQuestionAnswering(model, pretrained_towers=True)
    if train.init_from:
        _init_from(net, Path(train.init_from))
    processor = VQAProcessor.from_config(model)
    train_set = _dataset(train_examples, vocab, net, processor, train, data)
    val_set = _dataset(val_examples, vocab, net, processor, train, data) if val_examples else None
    params = apply_strategies(net, train)
    logger.info("parameters: %s trainable of %s (%.2f%%)", f"{params['trainable']:,}", f"{params['total']:,}",
                100 * params["trainable"] / params["total"])

    world = train.devices * train.num_nodes if train.strategy != "auto" else 1
    plan = make_plan(len(train_set), train.batch_size, train.epochs, train.max_steps, world)
    logger.info("%s", plan.describe())
    system = VQASystem(net, train, total_steps=plan.steps, val_groups=validation_groups(val_examples))
    datamodule = VQADataModule(train_set, val_set, train.batch_size, data.num_workers, train.eval_batch_size,
                               seed=train.seed, group_by_image=train.group_by_image, share_images=True)
    resume_state = ResumeState()
    callbacks = [*_checkpoint_callbacks(train, out, val_set), resume_state, PlanTimer(plan), *(callbacks or [])]
    trainer = _trainer(train, out, callbacks, precision, plan)
    last = resume_checkpoint(out / "checkpoints") if train.resume else None
    ckpt_path = str(last) if last else None
    if ckpt_path:
        logger.info("resuming from %s", last)
    start_tracking(trainer, resolved, training_plan(train, plan, params, train_examples,
                                                    val_examples, len(vocab)))
    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:  # DDP: rank 0 alone writes the checkpoint directory and evaluates
        return {"run_dir": str(out), "global_rank": trainer.global_rank}

    ckpt = out / "checkpoint"
    merged = merge_lora(net, ckpt / "adapters")  # before .cpu(): QLoRA dequantizes on the GPU
    net = net.cpu().float()
    net.save_pretrained(ckpt, tokenizer=processor.tokenizer)
    vocab.to_json(ckpt / "answer_vocab.json")
    metadata = run_metadata(trainer, resume_state, train, params, train_examples, val_examples, skipped)
    metadata.update(precision=precision, optimizer=train.optimizer, lora_merged_towers=merged,
                    answer_vocab_size=len(vocab), plan=plan.to_dict(), command=command,
                    skipped_nonfinite_batches=system.skipped_nonfinite)
    if train.export_onnx:
        metadata["onnx_export_s"] = _export_onnx(ckpt)
        if train.verify_int8 and metadata["onnx_export_s"] is not None:
            metadata["int8_check"] = _verify_int8(ckpt, val_examples, train.int8_max_drop)
    return finish_run(out, ckpt, metadata, data, train, evaluate, trainer=trainer)


def classifier_dataset(examples, vocab, net, processor, train: TrainConfig, data: DataConfig):
    """The classifier's dataset (feature cache for frozen towers), for families with two towers."""
    return _dataset(examples, vocab, net, processor, train, data)


def _verify_int8(ckpt: Path, val_examples: list, max_drop: float) -> dict | None:
    """The INT8 accuracy check on the validation questions (``vqakit.eval.int8``), or ``None`` with a warning when
    there are none or it fails (then float32 is served by default)."""
    if not val_examples:
        logger.warning("no INT8 check of %s: no validation questions (--data.val_fraction 0); it serves float32 "
                       "unless asked for INT8", ckpt)
        return None
    from vqakit.eval.int8 import verify_int8

    try:
        record = verify_int8(ckpt, val_examples, max_drop=max_drop)
    except Exception as err:  # noqa: BLE001 - the checkpoint is saved; serving falls back to float32
        logger.warning("INT8 check of %s failed (%s: %s); it serves float32 unless asked for INT8", ckpt,
                       type(err).__name__, str(err).splitlines()[0])
        return None
    return {k: record[k] for k in ("questions", "float32_accuracy", "int8_accuracy", "keeps_accuracy")}


def _export_onnx(ckpt: Path) -> float | None:
    """Export the checkpoint for the ONNX Runtime backend (what ``predict`` / ``serve`` use by default);
    the seconds it took, or ``None`` with a warning when it cannot be done here."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        logger.warning("not exporting %s to ONNX: onnxruntime is not installed", ckpt)
        return None
    from vqakit.inference.export import ensure_onnx

    start = time.perf_counter()
    try:
        ensure_onnx(ckpt)
    except Exception as err:  # noqa: BLE001 - the checkpoint is saved; serving falls back to PyTorch
        logger.warning("ONNX export of %s failed (%s: %s); it will be served with PyTorch", ckpt,
                       type(err).__name__, str(err).splitlines()[0])
        return None
    seconds = round(time.perf_counter() - start, 1)
    logger.info("exported %s/onnx in %.1f s (verified against PyTorch)", ckpt, seconds)
    return seconds
