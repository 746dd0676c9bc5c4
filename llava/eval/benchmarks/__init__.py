"""One module per benchmark, each implementing :class:`llava.eval.base.Benchmark`."""
