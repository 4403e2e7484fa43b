"""One exception type for bad input: the CLIs print its message as a single line and exit non-zero."""


class RefError(ValueError):
    """A problem with the user's input (model, data, options). The message names the problem and the fix."""
