"""Inference from a checkpoint directory, with no training code: the predictors (``VQAPredictor`` for the
classifier, ``GenerativePredictor`` for the generative families), ONNX export and runtime, and visualisation."""
