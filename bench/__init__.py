"""Benchmarks: accelerators side by side (:mod:`bench.accel`) and the pipeline's own overhead
(:mod:`bench.pipeline`); results and the exact commands in ``docs/benchmarks.md``."""
