"""`python -m ref COMMAND [ARGS]` (and the `ref` console script): run one of ref's commands, as
`python -m ref.COMMAND [ARGS]` does."""

from __future__ import annotations

import importlib
import sys

# command -> what it does; each is the module ref.COMMAND, whose `main(argv)` runs it
COMMANDS = {
    "unlearn": "unlearn a goal from a language model (RMU, Adaptive RMU, the paper's method)",
    "evaluate": "evaluate a model or a run folder on a goal's tasks",
    "generate": "continue prompts with a model",
    "attack": "attack the base and the unlearned model of a run",
    "sweep": "a grid of unlearning runs and the selection among them",
    "table1": "the paper's Table 1, every method on both goals for each model",
    "report": "the figures of a run or sweep folder",
}


USAGE = """usage: python -m ref COMMAND [ARGS]   (or: ref COMMAND [ARGS])

commands:
{commands}

python -m ref COMMAND --help lists a command's options."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"ref.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
