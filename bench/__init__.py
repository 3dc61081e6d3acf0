"""Benchmarks (not tests): ``python -m bench.primitives --json out.json``."""
