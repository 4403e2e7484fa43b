"""ref.experiments.claim: of processes claiming a point at once one gets it, a dead owner's claim is taken over by one,
a live owner's is left alone, and a claim made on another host is taken as live."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from ref.experiments import claim


def contenders(folder: Path, n: int) -> list[bool]:
    """n processes claim `folder` at once, each holding on until all have tried: which of them got it. They run
    ref/experiments/claim.py alone (it imports only the standard library) to start fast."""
    code = (
        f"import runpy, sys; claim = runpy.run_path({claim.__file__!r})['claim']; "
        f"print(claim({str(folder)!r}) is not None, flush=True); sys.stdin.read()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    got = [p.stdout.readline().strip() == "True" for p in procs]
    for p in procs:
        p.communicate("")
    return got


def dead_owner() -> dict:
    """An owner record of this host whose process has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = dict(claim.new_owner(), pid=proc.pid, birth=claim.process_birth(proc.pid))
    proc.kill()
    proc.wait()
    return owner


def test_a_claim_is_held_once_and_a_dead_owners_claim_is_taken_over(tmp_path):
    folder = tmp_path / "point"
    assert sum(contenders(folder, 4)) == 1  # O_CREAT | O_EXCL: one of four at once
    held = claim.read_owner(folder)
    assert held["host"] == socket.gethostname() and not claim.alive(held)  # its process has ended since
    assert sum(contenders(folder, 4)) == 1  # the dead owner's claim: taken over by exactly one
    assert claim.read_owner(folder)["token"] != held["token"] and not (folder / claim.TAKING).exists()

    (folder / claim.CLAIM).unlink()
    me = claim.claim(folder)
    assert me["pid"] == os.getpid() and claim.claim(folder) is None  # live: not taken
    claim.release(folder, me)
    assert claim.read_owner(folder) is None

    (folder / claim.CLAIM).write_text(json.dumps(dead_owner()))
    with claim.claimed(folder) as mine:
        assert mine is not None and claim.read_owner(folder) == mine  # stale: taken over
    assert claim.read_owner(folder) is None  # released on the way out
    (folder / claim.CLAIM).write_text(json.dumps(dead_owner() | {"host": "another-host"}))
    assert claim.claim(folder) is None  # another host's process cannot be seen from here: left alone
    (folder / claim.CLAIM).write_text("{")  # a claimant still writing it
    assert claim.claim(folder) is None
