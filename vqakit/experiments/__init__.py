"""Experiments over training runs: ``compare`` (strategies side by side), ``bench`` (a timed suite of recipes),
``report`` (paper, HTML and markdown from run directories) and ``tune`` (a budgeted hyperparameter search). compare
and bench drive the CLI in subprocesses; tune runs its trials in-process."""
