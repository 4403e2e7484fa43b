"""Experiments over many runs: sweeps and their launcher, Table 1, figures."""
