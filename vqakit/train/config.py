"""How a run trains: one typed config, saved with the run."""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("frozen", "lora", "full", "partial", "qlora")
NONFINITE_LOSS_ACTIONS = ("stop", "skip")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class LoraSettings:
    """LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) applied to one tower with PEFT.

    Args:
        rank: rank r of the update B @ A.
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the LoRA branch input.
        target_modules: module names to adapt; empty = the tower's defaults (the attention query and
            value projections; EfficientNet: the 1x1 ``_expand_conv`` and ``_project_conv``).
        layers: adapt only the target modules of the tower's last ``layers`` layers that hold any (transformer
            layers / EfficientNet MBConv blocks, input side counted first); 0 = every layer. The frozen layers
            below the lowest adapter then build no autograd graph: the backward pass stops there.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    layers: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be at least 1")


@dataclass
class TrainConfig:
    """Training settings.

    Args:
        vision: vision tower strategy: ``frozen`` (feature cache, fastest), ``lora``, ``full``,
            ``partial`` (only the last ``unfreeze_last_n`` layers train) or ``qlora`` (LoRA over a 4-bit
            NF4 base, bitsandbytes; CUDA only; transformers towers only, not EfficientNet's convolutions).
        text: text tower strategy: ``frozen``, ``lora``, ``full``, ``partial`` or ``qlora``.
        unfreeze_last_n: layers (EfficientNet blocks / transformer layers) that ``partial`` trains.
        init_from: start from this checkpoint directory's weights (e.g. stage 2 of two-stage training,
            after a ``frozen`` stage 1); its answer vocabulary must match this run's.
        lora_vision: LoRA settings of the vision tower (when ``vision=lora``).
        lora_text: LoRA settings of the text tower (when ``text=lora``).
        epochs: passes over the training questions.
        max_steps: stop after this many optimizer steps (-1: no limit).
        batch_size: questions per step.
        group_by_image: keep each image's questions together in the shuffled order (batches hold whole
            images; the image side of the model then runs once per image and serves all of its questions).
        lr: peak learning rate of the fusion layers and the head (AdamW).
        tower_lr: peak learning rate of pretrained tower weights that train (``full``/``partial``).
        lora_lr: peak learning rate of LoRA adapter weights (new, low-rank: a higher rate than ``tower_lr``).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_ratio: fraction of the steps with a linear warm-up, then cosine decay to 0.
        focal_from: with ``--model.focal_gamma`` > 0, the fraction of the planned steps trained with the plain
            loss first; the focal exponent then rises linearly to ``focal_gamma`` over the next tenth of the steps
            (0: focal from the first step). What the model learns early is then what the plain loss learns, and
            the focal form only changes the rest of the run.
        grad_clip: gradient norm clipping (0: off).
        precision: Lightning precision: ``32-true``, ``bf16-mixed`` (AMP; also on CPU), ``16-mixed``
            (fp16 AMP; on CPU it falls back to ``bf16-mixed``, as Lightning does), ``bf16-true``,
            ``16-true`` (GPU only), ``64-true``.
        optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes 8-bit states, CUDA only).
        seed: seed of weights init, shuffling and dropout.
        out_dir: run directory (config, logs, checkpoint, metrics).
        logger: experiment trackers: ``csv``, ``tensorboard``, ``mlflow``, ``wandb``, a comma-separated list of
            them (``csv,mlflow``), ``both`` (``csv,tensorboard``) or ``none``.
        tracking_uri: MLflow tracking store (default ``$MLFLOW_TRACKING_URI``, else ``file:./mlruns``).
        experiment: MLflow experiment / W&B project name.
        run_name: MLflow / W&B run name (default: the name of ``out_dir``).
        accelerator: Lightning accelerator: ``auto``, ``cpu``, ``gpu``.
        devices: devices (processes) per node.
        strategy: Lightning strategy: ``auto``, ``ddp`` (gloo on CPU, NCCL on GPU), ``ddp_spawn``, ``fsdp``.
        num_nodes: machines; launch one process per node with torchrun or SLURM (see the README).
        eval_batch_size: batch size of the evaluation after training.
        progress: show progress bars.
        checkpoint_every_n_examples: also save ``checkpoints/last.ckpt`` every this many training
            questions (0: only at epoch ends). The best-by-validation checkpoint is kept as ``best.ckpt``.
        val_every_n_steps: validate every this many training steps instead of at the end of each epoch (0: at
            epoch ends), e.g. to follow long epochs or to report to a hyperparameter search (``vqakit tune``).
        resume: continue from ``<out_dir>/checkpoints/last.ckpt`` (model, optimizer, scheduler, RNG and
            the position in the epoch's shuffled order); starts fresh when there is none. A ``last.ckpt``
            that cannot be read falls back to the previous one, ``last.prev.ckpt`` (and says so).
        on_nonfinite_loss: what a NaN/inf training loss does: ``stop`` (raise at once, naming the step, the
            batch's question ids and the last good checkpoint) or ``skip`` (no optimizer step for that batch;
            counted as ``skipped_nonfinite_batches`` in ``training_metadata.json``).
        export_onnx: export the classifier checkpoint to ONNX at the end (``<checkpoint>/onnx``, verified
            against PyTorch, tied to the weights), so ``predict`` / ``serve`` start on the fast backend; a failed
            export only warns (the first load tries again, then serves with PyTorch).
        verify_int8: after the export, answer up to 2,000 of the validation questions with the float32 and the
            INT8 exports and record both accuracies (``<checkpoint>/onnx/int8/accuracy.json``): ``predict`` /
            ``serve`` then serve INT8 by default where it keeps accuracy (``vqakit.eval.int8``).
        int8_max_drop: official accuracy points INT8 may lose against float32 on those questions and still be
            served by default.
        flush_denormal: on the CPU, treat float32 values below 1.2e-38 (denormals) as zero while the run trains
            and evaluates (x86 FTZ/DAZ, ARM FZ; ``torch.set_flush_denormal``). As attention sharpens, softmax
            weights and their gradients fall into that range, and CPU arithmetic on them is many times slower:
            without it a transfer-wide320 run's epochs slowed from 27.5 to 38 s as it trained. The values are
            too small to change a prediction. No effect on GPU math.
    """

    vision: str = "frozen"
    text: str = "frozen"
    unfreeze_last_n: int = 2
    init_from: str | None = None
    lora_vision: LoraSettings = field(default_factory=LoraSettings)
    lora_text: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = 10
    max_steps: int = -1
    batch_size: int = 128
    group_by_image: bool = False
    lr: float = 1e-3
    tower_lr: float = 5e-5
    lora_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    focal_from: float = 0.0
    grad_clip: float = 1.0
    precision: str = "32-true"
    optimizer: str = "adamw"
    seed: int = 0
    out_dir: str = "runs/easy-vqa"
    logger: str = "csv"
    tracking_uri: str | None = None
    experiment: str = "vqakit"
    run_name: str | None = None
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    eval_batch_size: int = 256
    progress: bool = True
    checkpoint_every_n_examples: int = 0
    val_every_n_steps: int = 0
    resume: bool = False
    on_nonfinite_loss: str = "stop"
    export_onnx: bool = True
    verify_int8: bool = True
    int8_max_drop: float = 0.2
    flush_denormal: bool = True

    def __post_init__(self):
        for flag, value in (("--train.vision", self.vision), ("--train.text", self.text)):
            if value not in STRATEGIES:
                raise ValueError(f"{flag}={value!r} is not one of {STRATEGIES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--train.precision={self.precision!r} is not one of {PRECISIONS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--train.optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
        from vqakit.train.tracking import logger_names

        logger_names(self.logger)  # raises on an unknown tracker
        if self.epochs < 1:
            raise ValueError(f"--train.epochs={self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"--train.batch_size={self.batch_size} must be at least 1")
        if self.unfreeze_last_n < 1:
            raise ValueError(f"--train.unfreeze_last_n={self.unfreeze_last_n} must be at least 1")
        if self.on_nonfinite_loss not in NONFINITE_LOSS_ACTIONS:
            raise ValueError(f"--train.on_nonfinite_loss={self.on_nonfinite_loss!r} is not one of "
                             f"{NONFINITE_LOSS_ACTIONS}")
        if self.checkpoint_every_n_examples < 0:
            raise ValueError(f"--train.checkpoint_every_n_examples={self.checkpoint_every_n_examples} must be >= 0")
        if not 0.0 <= self.focal_from < 1.0:
            raise ValueError(f"--train.focal_from={self.focal_from} must be in [0, 1): a fraction of the planned steps")
        if self.val_every_n_steps < 0:
            raise ValueError(f"--train.val_every_n_steps={self.val_every_n_steps} must be >= 0 (0: at epoch ends)")
        if isinstance(self.lora_vision, dict):
            self.lora_vision = LoraSettings(**self.lora_vision)
        if isinstance(self.lora_text, dict):
            self.lora_text = LoraSettings(**self.lora_text)
        for flag, lora in (("--train.lora_vision", self.lora_vision), ("--train.lora_text", self.lora_text)):
            check_lora_layers(lora.layers, flag)


def check_lora_layers(layers, flag: str = "--train.lora_*") -> None:
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"{flag}.layers={layers!r} must be a whole number >= 0 (0: every layer)")
