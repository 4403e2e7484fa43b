"""The exceptions the command lines turn into one line (ref.io.cli): bad input, a full disk, and an interruption handled
safely."""

from __future__ import annotations

import errno
from pathlib import Path

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class RefError(ValueError):
    """A problem with the user's input (model, data, options). The message names the problem and the fix."""


class DiskFull(RefError):
    """A write that failed because its disk (or the user's quota) is full; `path` is what was being written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"disk full while writing {path}; free some space and run the command again")


class Stopped(KeyboardInterrupt):
    """Ctrl-C (or a simulated interruption) handled at a safe point; the message says what was kept."""


def disk_full(e: BaseException | None) -> bool:
    """e, or an error it was raised from or while handling, is a full disk or quota. torch.save reports a failed
    write as a RuntimeError raised while handling the OSError, so the chain is followed."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False
