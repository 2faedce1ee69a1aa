"""Training of the generative families: GRU decoder, vision-prefixed LLM, pretrained VLM + LoRA.

The same data path as the classifier (examples -> feature cache for frozen towers -> batches), plus the
answer text of each question, which the family's model turns into target ids (teacher forcing). The
target is the majority human answer (every easy-VQA question has one answer, given ten times).

A family provides ``build(cfg, train_examples)`` returning ``(model, processor)``; the model has
``forward(**inputs, answers=...) -> output with .loss``, ``generate(**inputs)``, ``save_pretrained``
and ``trainable_report()``-free PyTorch parameters, nothing else. Checkpoints go to
``<out_dir>/checkpoint`` as for the classifier and are evaluated with the generative metrics.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import yaml
from torch import nn

from vqakit.data.answers import AnswerVocab, majority_answer
from vqakit.data.config import DataConfig, split_validation
from vqakit.train.checkpointing import ResumeState, resume_checkpoint
from vqakit.train.config import TrainConfig
from vqakit.train.datamodule import VQACollator, VQADataModule, model_inputs
from vqakit.train.nonfinite import checked_loss
from vqakit.train.plan import PlanTimer, make_plan
from vqakit.train.run import (
    _load_train_examples,
    _trainer,
    finish_run,
    flushing_denormals,
    run_metadata,
    start_tracking,
    training_plan,
)
from vqakit.train.schedule import warmup_cosine_schedule
from vqakit.train.tracking import check_trackers

logger = logging.getLogger("vqakit")


class GenerativeCollator(VQACollator):
    """``VQACollator`` plus ``answers``: the majority answer text of each question in the batch."""

    def __init__(self, processor, answers: list[str]):
        super().__init__(processor)
        self.answers = answers

    def __call__(self, items: list[dict]) -> dict:
        batch = super().__call__(items)
        batch["answers"] = [self.answers[int(i)] for i in batch["index"]]
        return batch


class GenerativeDataModule(VQADataModule):
    def __init__(self, train_set, val_set, batch_size, num_workers=0, eval_batch_size=256, seed=0, collate_fn=None):
        """``collate_fn``: the family's own collator for both splits (the chat VLMs build whole conversations)."""
        super().__init__(train_set, val_set, batch_size, num_workers, eval_batch_size, seed)
        self.collate = collate_fn or GenerativeCollator(train_set.processor,
                                                        [majority_answer(e.answers) for e in train_set.examples])
        self.val_collate = collate_fn
        if val_set and collate_fn is None:
            self.val_collate = GenerativeCollator(val_set.processor, [majority_answer(e.answers) for e in val_set.examples])

    def val_dataloader(self):
        if not self.val_set:
            return []
        from torch.utils.data import DataLoader

        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.val_collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class GenerativeSystem(L.LightningModule):
    """Teacher-forced token cross-entropy; validation logs the loss and ``val/answer_exact``: the share of
    answers whose every target token (``<eos>`` included) is the argmax under teacher forcing."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.skipped_nonfinite = 0  # batches skipped for a NaN/inf loss (--train.on_nonfinite_loss skip)

    def forward(self, batch: dict):
        if "chat_inputs" in batch:  # the chat VLMs' collator gives the processor's tensors with their labels
            return self.model(**batch["chat_inputs"])
        return self.model(answers=batch["answers"], **model_inputs(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        out = self(batch)
        loss = checked_loss(self, out.loss, batch)
        if loss is None:  # a NaN/inf loss, skipped: no backward, no optimizer step
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["answers"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        n = len(batch["answers"])
        self.log("val/loss", out.loss, prog_bar=True, batch_size=n)
        if out.answer_exact is not None:
            self.log("val/answer_exact", out.answer_exact.float().mean(), prog_bar=True, batch_size=n)

    def configure_optimizers(self):
        pretrained = {id(p) for m in self.model.pretrained_modules() for p in m.parameters()}
        groups: dict[tuple[str, bool], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            part = "lora" if "lora_" in name else "tower" if id(p) in pretrained else "new"
            decay = p.dim() >= 2 and "image_pos" not in name and "embed" not in name
            groups.setdefault((part, decay), []).append(p)
        lr = {"new": self.cfg.lr, "tower": self.cfg.tower_lr, "lora": self.cfg.lora_lr}
        optimizer = torch.optim.AdamW([{"params": ps, "lr": lr[part], "weight_decay": self.cfg.weight_decay if decay
                                        else 0.0} for (part, decay), ps in groups.items()])
        scheduler = warmup_cosine_schedule(optimizer, self.total_steps, self.cfg.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _family(model_cfg):
    """The family module of a generative config: ``build``, ``apply_strategies``, ``finalize``."""
    from vqakit.models.registry import family_of_config

    family = family_of_config(model_cfg)
    if family.training is None:
        raise ValueError(f"no generative family for {type(model_cfg).__name__}")
    return family.training_module()


@flushing_denormals
def fit_generative(model_cfg, data: DataConfig, train: TrainConfig, evaluate: bool = True,
                   command: str | None = None) -> dict:
    """Train a generative model as configured; returns a summary (paths, time to train, metrics)."""
    family = _family(model_cfg)
    check_trackers(train)  # an unreachable tracking server fails before anything loads
    out = Path(train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {family.KEY: asdict(model_cfg), "data": asdict(data), "train": asdict(train)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    L.seed_everything(train.seed, workers=True, verbose=False)

    examples, skipped = _load_train_examples(data, train.progress)
    if not getattr(family, "MULTI_IMAGE", False):
        from vqakit.data.example import require_single_image

        require_single_image(examples, f"the {family.KEY} family")
    train_examples, val_examples = split_validation(examples, data.val_fraction, data.seed)
    vocab = AnswerVocab.build([e.answers for e in train_examples], top_k=data.top_k_answers)
    net, processor = family.build(model_cfg, train_examples, train)
    train_set = family.dataset(train_examples, vocab, net, processor, train, data)
    val_set = family.dataset(val_examples, vocab, net, processor, train, data) if val_examples else None
    params = family.apply_strategies(net, train)
    logger.info("parameters: %s trainable of %s (%.2f%%)", f"{params['trainable']:,}", f"{params['total']:,}",
                100 * params["trainable"] / params["total"])

    plan = make_plan(len(train_set), train.batch_size, train.epochs, train.max_steps)
    logger.info("%s", plan.describe())
    system = GenerativeSystem(net, train, total_steps=plan.steps)
    collate = family.collator(processor) if hasattr(family, "collator") else None
    datamodule = GenerativeDataModule(train_set, val_set, train.batch_size, data.num_workers, train.eval_batch_size,
                                      seed=train.seed, collate_fn=collate)
    resume_state = ResumeState()
    trainer = _trainer(train, out, [*_checkpoint_callbacks(out, val_set), resume_state, PlanTimer(plan)],
                       train.precision, plan)
    last = resume_checkpoint(out / "checkpoints") if train.resume else None
    ckpt_path = str(last) if last else None
    start_tracking(trainer, resolved, training_plan(train, plan, params, train_examples,
                                                    val_examples, len(vocab)))
    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return {"run_dir": str(out), "global_rank": trainer.global_rank}

    ckpt = out / "checkpoint"
    net = net.cpu()
    family.save(net, processor, ckpt)
    vocab.to_json(ckpt / "answer_vocab.json")
    metadata = {"model_type": family.KEY, "command": command,
                **run_metadata(trainer, resume_state, train, params, train_examples, val_examples, skipped),
                "plan": plan.to_dict()}
    return finish_run(out, ckpt, metadata, data, train, evaluate, trainer=trainer)


def _checkpoint_callbacks(out: Path, val_set) -> list:
    """``last.ckpt`` at every epoch end (``--train.resume true`` continues from it) and ``best.ckpt`` by the
    validation loss (every family logs it; BLIP has no teacher-forced answer accuracy). As :mod:`vqakit.train.run` does; with the ``save_top_k=0`` callback alone, no
    ``last.ckpt`` was written in our runs (Lightning 2.6)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True,
                                 save_on_train_epoch_end=True)]
    if val_set:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/loss",
                                         mode="min", save_top_k=1, enable_version_counter=False))
    return callbacks
