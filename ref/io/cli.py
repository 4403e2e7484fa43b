"""The one ending of every `python -m ref.*` command.

The project's own errors (RefError: bad input, the message names the problem and the fix) and the OS errors a user
can cause (permissions, a full or read-only disk, a missing file or folder) print one line and exit 2; Ctrl-C
exits 130 saying what was kept; anything else is a programming error and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from ref.io.errors import RefError, Stopped

# errno values of OS errors a user causes and can fix; others (EBADF, EINVAL...) are ours and keep the traceback
USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
}


def run_command(command: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """command(argv)'s exit code, or 2 after one line on stderr for a user's error, 130 after Ctrl-C."""
    try:
        return command(argv)
    except RefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{f': {e}' if isinstance(e, Stopped) else ''}", file=sys.stderr)
        return 130
