"""Benchmarks (`make bench`): ours against the WMDP reference's way of running RMU on transformers."""
