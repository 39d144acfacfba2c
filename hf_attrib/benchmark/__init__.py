"""Benchmark settings: models, data, ground truth and the runner."""
