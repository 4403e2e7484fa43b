"""`python -m ref.table1`: the paper's Table 1, every method on both goals for each model.

The code is in ref/experiments/table1.py."""

import sys

from ref.experiments.table1 import main

if __name__ == "__main__":
    sys.exit(main())
