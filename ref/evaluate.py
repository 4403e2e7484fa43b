"""`python -m ref.evaluate`: evaluate a model or a run folder on a goal's tasks.

The code is in ref/evaluation/evaluate.py."""

import sys

from ref.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
