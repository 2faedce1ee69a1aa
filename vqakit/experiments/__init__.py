"""Experiments over training runs: ``compare`` (strategies side by side), ``bench`` (a timed suite of recipes) and
``report`` (paper, HTML and markdown from run directories). They drive the CLI in subprocesses."""
