"""Training: LightningModule, DataModule, strategies (frozen / LoRA / full) and the run."""
