"""The exceptions the command lines turn into one line (ref.cli): bad input, and an interruption handled safely."""


class RefError(ValueError):
    """A problem with the user's input (model, data, options). The message names the problem and the fix."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C (or a simulated interruption) handled at a safe point; the message says what was kept."""
