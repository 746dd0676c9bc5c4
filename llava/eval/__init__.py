"""Benchmark evaluation: one module per benchmark (``llava.eval.benchmarks``) behind one interface
(:mod:`llava.eval.base`), a shared batched, sharded and resumable runner (:mod:`llava.eval.runner`)."""
