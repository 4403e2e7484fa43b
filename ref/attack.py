"""`python -m ref.attack`: attack the base and the unlearned model of a run.

The code is in ref/attacks/attack.py."""

import sys

from ref.attacks.attack import main

if __name__ == "__main__":
    sys.exit(main())
