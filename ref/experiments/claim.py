"""The claim of a sweep point: an exclusive lock file in the point's folder naming its owner, so that two workers,
two array tasks or two launches of one sweep never run the same point at once.

    OUT/rmu/lr=0.001/claim.json   {"host": "node7", "pid": 4242, "birth": "81230", "token": "9f1c...", ...}

Claiming creates the file with O_CREAT | O_EXCL: of two processes, one gets it. A claim whose owner died (the same
host, its process gone) is stale and the next claimant takes it over; the point then resumes from its checkpoint.
The owner removes the file when the point ends, however it ends short of being killed. A claim made on another
host is taken to be live: this host cannot see that process (`ref.sweep --status` names the owner).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLAIM = "claim.json"
TAKING = ".claim.taking"  # exists for the instant of a takeover: two claimants cannot both take one stale claim
CLAIM_FILES = {CLAIM, TAKING}


def process_birth(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux /proc): tells the owner from a later process that
    got its pid. None when no such process runs (a zombie counts as gone) or without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name: field 3 (state) onwards
    return None if fields[0] == "Z" else fields[19]  # field 22: starttime


def new_owner() -> dict:
    """This process as a claim's owner; the token tells two claims of one process apart."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    return dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        birth=process_birth(os.getpid()),
        token=uuid.uuid4().hex,
        since=time.strftime("%Y-%m-%d %H:%M:%S"),
        slurm_job=job,
    )


def alive(owner: dict) -> bool:
    """Whether the owner may still be running the point: its process here, or any claim made on another host."""
    if owner.get("host") != socket.gethostname():
        return True
    if Path("/proc").is_dir():
        birth = owner.get("birth")
        return birth is not None and process_birth(owner["pid"]) == birth
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def where(owner: dict) -> str:
    """`node7 pid 4242 (SLURM job 123_4)`."""
    job = f" (SLURM job {owner['slurm_job']})" if owner.get("slurm_job") else ""
    return f"{owner.get('host', 'an unknown host')} pid {owner.get('pid', '?')}{job}"


def read_owner(folder: Path) -> dict | None:
    """The owner of the point's claim; None when unclaimed, {} while a claimant is still writing it (live)."""
    try:
        return json.loads((Path(folder) / CLAIM).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"host": None}


def create(path: Path, owner: dict) -> bool:
    """Create `path` holding `owner`, only if it does not exist (atomic: O_CREAT | O_EXCL)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
        f.flush()
        os.fsync(f.fileno())
    return True


def claim(folder: Path) -> dict | None:
    """Claim the point in `folder` (made if missing) for this process: our owner record, or None when a live owner
    holds it. A stale claim is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    me = new_owner()
    if create(folder / CLAIM, me):
        return me
    held = read_owner(folder)
    if held is None:  # released meanwhile
        return me if create(folder / CLAIM, me) else None
    if alive(held):
        return None
    return me if take_over(folder, held, me) else None


def take_over(folder: Path, stale: dict, me: dict) -> bool:
    """Replace the stale claim by ours: TAKING (created O_EXCL) lets one claimant at a time check that the claim is
    still the stale one and put its own in place (a rename, atomic)."""
    taking = folder / TAKING
    if not create(taking, me):
        return False
    if read_owner(folder) != stale:  # taken over or released meanwhile
        taking.unlink()
        return False
    os.replace(taking, folder / CLAIM)
    return True


def release(folder: Path, me: dict) -> None:
    """Remove our claim (one that another process took over is left to it)."""
    if read_owner(folder) == me:
        (Path(folder) / CLAIM).unlink(missing_ok=True)


@contextmanager
def claimed(folder: Path) -> Iterator[dict | None]:
    """Inside: our owner record when we hold the point's claim (released on the way out), else None."""
    me = claim(folder)
    try:
        yield me
    finally:
        if me is not None:
            release(folder, me)
