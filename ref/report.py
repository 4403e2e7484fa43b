"""`python -m ref.report`: the figures of a run or sweep folder.

The code is in ref/experiments/report.py."""

import sys

from ref.experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
