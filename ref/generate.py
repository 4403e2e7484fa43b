"""`python -m ref.generate`: continue prompts with a model.

The code is in ref/evaluation/generate.py."""

import sys

from ref.evaluation.generate import main

if __name__ == "__main__":
    sys.exit(main())
