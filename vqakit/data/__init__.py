"""Data: sources -> examples, answer normalisation and vocabulary, image loading, feature cache."""
