"""Data: sources -> examples, answer normalisation and vocabulary, image loading, dataset formats and statistics,
the feature cache (and filling it with a model's frozen towers), and ``prepare`` (the ``vqakit prepare`` pipeline)."""
