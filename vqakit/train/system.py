"""The LightningModule: loss, metrics and optimizers around a ``TwoTowerForQuestionAnswering``.

Method order follows the Lightning style guide: init, forward, training_step, validation_step,
configure_optimizers.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vqakit.models.two_tower import vqa_loss
from vqakit.train.config import TrainConfig
from vqakit.train.datamodule import model_inputs
from vqakit.train.nonfinite import checked_loss
from vqakit.train.schedule import warmup_cosine_schedule
from vqakit.train.tracking import metric_keys

FOCAL_RAMP = 0.1  # with --train.focal_from: the fraction of the planned steps over which the focal exponent rises
MAX_VAL_GROUPS = 12  # question types scored apart on the validation split at most (families); more: answer types


def validation_groups(examples: list) -> list[str] | None:
    """The group each validation question is scored in apart (``val/vqa_score_per_type/<group>``): its question
    type where the data gives every question one and there are 2 to ``MAX_VAL_GROUPS`` of them (a family of
    questions, as in the transfer suite), else its answer type (yes/no, number, other: VQA v2's 65 question types
    and easy-VQA's 29 three-word prefixes are too many); ``None`` when there is one group only. A family the run
    has not learned then shows in the curves while it trains, not only in the evaluation after it."""
    types = [e.question_type for e in examples]
    if all(types) and 2 <= len(set(types)) <= MAX_VAL_GROUPS:
        return types
    answer_types = [e.answer_type for e in examples]
    return answer_types if len(set(answer_types)) >= 2 else None


class VQASystem(L.LightningModule):
    def __init__(self, model, cfg: TrainConfig, total_steps: int, val_groups: list[str] | None = None):
        """``val_groups``: one group name per validation question (by dataset index, :func:`validation_groups`);
        each group's VQA score is logged as ``val/vqa_score_per_type/<group>`` besides the overall one."""
        super().__init__()
        self.model = model
        self.cfg = cfg
        # Given, not read from trainer.estimated_stepping_batches: that builds the train loader before a
        # checkpoint is restored, and Lightning (2.6) then never loads the saved loader position.
        self.total_steps = max(1, total_steps)
        self.skipped_nonfinite = 0  # batches skipped for a NaN/inf loss (--train.on_nonfinite_loss skip)
        n = model.config.num_answers
        self.val_vqa_score = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro", ignore_index=-100)
        names = sorted(set(val_groups)) if val_groups else []
        index = {g: i for i, g in enumerate(names)}
        keys = metric_keys(names)  # unique where two groups differ only in characters a metric name cannot hold
        self.val_group_keys = [keys[g] for g in names]
        # the group of each validation question by dataset index (a buffer: moves to the device with the model)
        self.register_buffer("val_group_of", torch.tensor([index[g] for g in val_groups] if names else [],
                                                          dtype=torch.long), persistent=False)
        self.val_group_scores = nn.ModuleList(MeanMetric() for _ in names)

    def forward(self, batch: dict):
        return self.model(**model_inputs(batch))

    def focal_gamma(self) -> float:
        """The focal exponent at this step: ``--model.focal_gamma``, after ``--train.focal_from`` of the planned
        steps with the plain loss and a linear rise over the next tenth."""
        gamma, start = self.model.config.focal_gamma, self.cfg.focal_from
        if not gamma or not start:
            return gamma
        return gamma * min(1.0, max(0.0, (self.global_step / self.total_steps - start) / FOCAL_RAMP))

    def compute_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return vqa_loss(logits, batch["targets"], batch["labels"], self.model.config.loss, self.focal_gamma())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        logits = self(batch).logits
        loss = checked_loss(self, self.compute_loss(logits, batch), batch)
        if loss is None:  # a NaN/inf loss, skipped: no backward, no optimizer step
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch).logits
        loss = self.compute_loss(logits, batch)
        # VQA score of the top answer: its soft target, min(humans / 3, 1) (Teney et al., 2018)
        score = batch["targets"].gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
        self.val_vqa_score.update(score)
        self.val_acc.update(logits, batch["labels"])
        self.log("val/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("val/vqa_score", self.val_vqa_score, prog_bar=True, batch_size=len(logits))
        self.log("val/acc", self.val_acc, batch_size=len(logits))
        if self.val_group_keys:
            groups = self.val_group_of[batch["index"]]
            # every group at every step, with no scores where the batch has none: under DDP each rank must log
            # the same metrics, or the ranks wait on each other's sync at the epoch's end
            for i, metric in enumerate(self.val_group_scores):
                metric.update(score[groups == i])
                self.log(f"val/vqa_score_per_type/{self.val_group_keys[i]}", metric, batch_size=len(logits))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave frozen tower weights out of ``last.ckpt`` / ``best.ckpt``: a resumed run rebuilds them from
        their source (the pretrained tower, then ``init_from``) before loading the checkpoint, so each
        checkpoint would otherwise carry an unchanged copy of up to the whole model. The names left out are
        recorded, and checked when loading."""
        frozen = self._frozen_tower_keys()
        state = checkpoint["state_dict"]
        for key in frozen:
            del state[key]
        checkpoint["vqakit_frozen_tower_keys"] = sorted(frozen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        omitted = checkpoint.get("vqakit_frozen_tower_keys")
        if omitted is None:  # a checkpoint with every weight
            return
        frozen = self._frozen_tower_keys()
        if set(omitted) != frozen:
            raise ValueError(f"the checkpoint left out {len(omitted)} frozen tower weights but this run freezes "
                             f"{len(frozen)}: it was saved under other strategies (--train.vision/--train.text/"
                             f"--train.unfreeze_last_n); resume with the settings it was trained with")
        current = self.state_dict()
        checkpoint["state_dict"].update({key: current[key] for key in omitted})  # as rebuilt from the source

    def _frozen_tower_keys(self) -> set[str]:
        towers = (self.model.backbone.vision, self.model.backbone.text)
        frozen = {id(p) for tower in towers for p in tower.parameters() if not p.requires_grad}
        return {name for name, p in self.named_parameters() if id(p) in frozen}

    def configure_optimizers(self):
        towers = {id(p) for p in self.model.backbone.vision.parameters()} | {
            id(p) for p in self.model.backbone.text.parameters()
        }
        groups = {f"{part}_{d}": [] for part in ("fusion", "tower", "lora") for d in ("decay", "no_decay")}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            part = "lora" if "lora_" in name else "tower" if id(p) in towers else "fusion"
            decay = p.dim() >= 2 and "image_pos" not in name  # no decay on biases, norms, positions
            groups[f"{part}_{'decay' if decay else 'no_decay'}"].append(p)
        wd = self.cfg.weight_decay
        param_groups = [
            {"params": groups["fusion_decay"], "lr": self.cfg.lr, "weight_decay": wd},
            {"params": groups["fusion_no_decay"], "lr": self.cfg.lr, "weight_decay": 0.0},
            {"params": groups["tower_decay"], "lr": self.cfg.tower_lr, "weight_decay": wd},
            {"params": groups["tower_no_decay"], "lr": self.cfg.tower_lr, "weight_decay": 0.0},
            {"params": groups["lora_decay"], "lr": self.cfg.lora_lr, "weight_decay": wd},
            {"params": groups["lora_no_decay"], "lr": self.cfg.lora_lr, "weight_decay": 0.0},
        ]
        param_groups = [g for g in param_groups if g["params"]]
        if self.cfg.optimizer == "adamw8bit":  # 8-bit optimizer states (Dettmers et al., 2022); CUDA only
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(param_groups)
        else:
            optimizer = torch.optim.AdamW(param_groups)
        scheduler = warmup_cosine_schedule(optimizer, self.total_steps, self.cfg.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
