"""`python -m ref.sweep`: a grid of unlearning runs and the selection among them.

The code is in ref/experiments/sweep.py."""

import sys

from ref.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
