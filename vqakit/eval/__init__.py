"""Evaluation: the official VQA accuracy and classification diagnostics of a set of predictions."""

from vqakit.eval.metrics import (
    CSV_COLUMNS,
    PredictionRecord,
    compute_metrics,
    failure_summary,
    per_question_accuracy,
    write_predictions_csv,
)
from vqakit.eval.vqa_accuracy import official_accuracy, vqa_accuracy

__all__ = [
    "CSV_COLUMNS",
    "PredictionRecord",
    "compute_metrics",
    "failure_summary",
    "official_accuracy",
    "per_question_accuracy",
    "vqa_accuracy",
    "write_predictions_csv",
]
