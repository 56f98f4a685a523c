"""Measuring samples: the evaluator, feature extractors and metrics."""
