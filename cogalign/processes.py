"""Stage child processes: die with the parent, and clean up after a killed run (no Prefect import)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
from pathlib import Path

PID_FILE = Path(".cogalign/stage.pid")


def die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def group_members_in(pgid: int, workspace: Path) -> list[int]:
    """Live pids of process group ``pgid`` whose working directory is ``workspace``.

    Checking the cwd guards against a recycled group id belonging to an unrelated process.
    """
    members = []
    root = workspace.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and Path(os.readlink(entry / "cwd")).resolve() == root:
                members.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return members


def kill_stale_stage(workspace: Path) -> int | None:
    """End a stage process group left by a killed run (from the pid file); return its pgid.

    The group leader is the ``dvc repro`` child; the stage command DVC started is in the same
    group, so ending the group releases DVC's lock.
    """
    pid_file = workspace / PID_FILE
    if not pid_file.exists():
        return None
    try:
        pgid = int(json.loads(pid_file.read_text())["pgid"])
    except (ValueError, KeyError, OSError):
        pid_file.unlink(missing_ok=True)
        return None
    members = group_members_in(pgid, workspace)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return pgid if members else None
