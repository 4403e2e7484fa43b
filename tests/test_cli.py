"""ref.io.cli: the one ending of every python -m ref.* command."""

from __future__ import annotations

import errno

import pytest

from ref.io.cli import run_command
from ref.io.errors import RefError, Stopped


def raising(exc):
    def command(argv):
        raise exc

    return command


def test_user_errors_print_one_line_and_exit_2(capsys):
    assert run_command(raising(RefError("--lr is -1: use a positive learning rate"))) == 2
    assert capsys.readouterr().err == "error: --lr is -1: use a positive learning rate\n"
    assert run_command(raising(PermissionError(errno.EACCES, "Permission denied", "/ro/run.json"))) == 2
    assert capsys.readouterr().err == "error: Permission denied: /ro/run.json\n"
    assert run_command(raising(OSError(errno.ENOSPC, "No space left on device"))) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"


def test_interruptions_exit_130_and_say_what_was_kept(capsys):
    assert run_command(raising(Stopped("the checkpoint of step 3 is in run/checkpoint.pt"))) == 130
    assert capsys.readouterr().err == "\ninterrupted: the checkpoint of step 3 is in run/checkpoint.pt\n"
    assert run_command(raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


def test_programming_errors_keep_their_traceback():
    with pytest.raises(KeyError):
        run_command(raising(KeyError("bug")))
    with pytest.raises(OSError):
        run_command(raising(OSError(errno.EBADF, "Bad file descriptor")))
    assert run_command(lambda argv: len(argv), ["a", "b"]) == 2
