"""Benchmarks: model shapes, an analytic FLOP model, and training/inference speed measurements."""
