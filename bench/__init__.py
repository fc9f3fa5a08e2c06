"""Benchmarks: printed figures side by side with a baseline measured in the same run."""
