"""Benchmarks and GPU checks, run from the repository root.

For example ``python -m benchmarks.engine_bench``; docs/benchmarks.md lists them all.

Not part of the installed package: nothing under ``consumer/`` imports them.
"""
