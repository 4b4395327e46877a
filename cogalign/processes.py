"""Child processes of a run (stage workers, the Prefect server): die with the run, and clean up
after a killed one (no Prefect import).

Every long-lived child of a run leads its own process group: a stage worker (``cogalign.stage_worker``,
whose stage commands DVC starts inside that group) or a supervisor (``python -m cogalign.processes --
CMD``, e.g. the ephemeral Prefect server). The kernel signals the leader when the run that started it
dies, even by SIGKILL (``PR_SET_PDEATHSIG``), and the leader then kills its whole group, so no
grandchild outlives the run. Each group is also recorded in the workspace's state folder
(``.cogalign/groups/<pgid>.json``) with its owner; a later run ends any recorded group whose owner is
gone (:func:`kill_stale_groups`). This module stays light: supervisors import nothing else at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child process: receive ``sig`` when the parent dies (Linux ``PR_SET_PDEATHSIG``).

    "The parent" is the thread that started the child: start long-lived children from a thread that
    lives as long as they should.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)


LOG_RESERVE = 64 * 1024   # bytes of a stage log allocated before the stage starts
LOG_TAIL = 16 * 1024      # the last bytes of a stage's output kept in memory


class StageLog:
    """Copies a stage's output to our stdout (the stage log) so that its end survives a full disk.

    Space for the first ``LOG_RESERVE`` bytes is allocated before the stage starts, and the last
    ``LOG_TAIL`` bytes are kept in memory. When a write fails (disk full, quota), the rest of the
    output is dropped, and at the end the kept tail, which holds the stage's exception, is written
    into the reserved space with a line saying what was lost: a failed stage's log always keeps
    its cause. Non-file outputs (a pipe, a terminal) are written through without a reserve.
    """

    def __init__(self, fd: int) -> None:
        import fcntl
        import stat

        self.fd = fd
        self.tail = bytearray()
        self.error: OSError | None = None
        self.start = self.reserved_end = 0
        self.closed = False
        st = os.fstat(fd)
        self.is_file = stat.S_ISREG(st.st_mode) and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        if self.is_file:
            self.start = os.lseek(fd, 0, os.SEEK_CUR)
            for size in (LOG_RESERVE, LOG_TAIL + 1024):  # a smaller reserve on a nearly full disk
                try:
                    os.posix_fallocate(fd, self.start, size)
                except OSError:
                    continue
                self.reserved_end = self.start + size
                break

    def write(self, data: bytes) -> None:
        self.tail += data
        del self.tail[:-LOG_TAIL]
        view = memoryview(data)
        while view and self.error is None:
            try:
                view = view[os.write(self.fd, view):]
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        """Cut the unused reserve; after a lost write, put the kept tail where it fits (once)."""
        if not self.is_file or self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            pos = os.lseek(self.fd, 0, os.SEEK_CUR)
            if self.error is not None:
                note = (f"\n[cogalign: this log could not be written in full ({self.error.strerror}); the last "
                        f"{len(self.tail)} bytes of the stage's output follow]\n").encode()
                block = note + bytes(self.tail)
                pos = max(self.start, min(pos, max(self.reserved_end, pos) - len(block)))
                os.pwrite(self.fd, block, pos)
                pos += len(block)
            os.ftruncate(self.fd, pos)
            os.lseek(self.fd, pos, os.SEEK_SET)



def lead_group(on_term: Callable[[], None] | None = None) -> None:
    """In a process group leader: kill the whole group on SIGTERM/SIGHUP/SIGINT or when the parent dies.

    ``on_term`` (optional, called with no argument) runs first, e.g. to let a server stop cleanly.
    """
    parent = os.getppid()

    def kill_group(signum: int, frame: object) -> None:
        if on_term is not None:
            with contextlib.suppress(Exception):
                on_term()
        os.killpg(os.getpgid(0), signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, kill_group)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        kill_group(signal.SIGTERM, None)


def supervise(cmd: list[str], grace: float = 0.0) -> int:
    """Run ``cmd`` inside this process group; kill the whole group if our parent dies.

    Must run as the group leader (started with ``start_new_session``). The command's output goes
    to our stdout through :class:`StageLog`. With ``grace`` > 0 a stop request first sends SIGTERM
    to ``cmd`` and waits up to ``grace`` seconds for it to exit (a server flushing its database).
    Returns ``cmd``'s exit code.
    """
    child: list[subprocess.Popen[bytes]] = []
    log = StageLog(1)

    def stop_child() -> None:
        # Runs in a signal handler that may interrupt Popen.wait() (which holds Popen's wait lock):
        # wait with os.waitpid directly.
        if grace > 0 and child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0].pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(child[0].pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.05)
        log.close()

    lead_group(stop_child)
    child.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    stdout = child[0].stdout
    assert stdout is not None
    try:
        while chunk := os.read(stdout.fileno(), 1 << 16):
            log.write(chunk)
        return child[0].wait()
    finally:
        log.close()


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


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def groups_dir(workspace: Path) -> Path:
    """Where ``workspace``'s process-group records live (in its unversioned state folder)."""
    from cogalign.workspace import STATE_DIR

    return workspace / STATE_DIR / "groups"


def _owner_alive(pid: int, started: object) -> bool:
    """True while process ``pid`` runs and is the one that was recorded (not a recycled pid)."""
    now = _start_time(pid)
    if now is None:
        return False
    return not isinstance(started, int | float) or abs(now - started) < 0.01


def record_group(workspace: Path, pgid: int, role: str) -> Path:
    """Record that this process owns group ``pgid`` (started with ``workspace`` as its cwd)."""
    from cogalign_core.io import atomic_write_text

    path = groups_dir(workspace) / f"{pgid}.json"
    atomic_write_text(path, json.dumps({"pgid": pgid, "role": role, "owner_pid": os.getpid(),
                                        "owner_started": _start_time(os.getpid())}))
    return path


def forget_group(workspace: Path, pgid: int) -> None:
    (groups_dir(workspace) / f"{pgid}.json").unlink(missing_ok=True)


def recorded_groups(workspace: Path) -> list[dict[str, object]]:
    """The group records of ``workspace`` (unreadable ones dropped)."""
    out = []
    for path in sorted(groups_dir(workspace).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    return out


def kill_stale_groups(workspace: Path) -> list[str]:
    """End every recorded group whose owner process is gone; return what was ended ("role group N").

    A group whose owner still runs (another process's Prefect server started in this workspace)
    is left alone. Members are matched by group id *and* working directory, so a recycled id is safe.
    """
    ended = []
    for rec in recorded_groups(workspace):
        try:
            pgid, owner = int(rec["pgid"]), int(rec["owner_pid"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            continue
        if _owner_alive(owner, rec.get("owner_started")):
            continue  # e.g. another process's Prefect server started in this workspace: not stale
        members = group_members_in(pgid, workspace)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if members:
            ended.append(f"{rec.get('role', 'process')} group {pgid}")
        forget_group(workspace, pgid)
    return ended


def end_group(leader: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """Stop a group this process started: SIGTERM to its leader (which ends the group, see
    :func:`lead_group`), up to ``grace`` seconds for it to exit, then SIGKILL to whatever is left.

    Waiting on the leader also reaps it (a dead leader not yet reaped still counts as a member).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        leader.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=max(grace, 0.01))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=5)


# Substrings of a stage's stderr that mark a transient failure worth retrying.
TRANSIENT_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "Unable to acquire lock", "is locked by",
                     "Resource temporarily unavailable")


def failure_cause(log_text: str, returncode: int) -> str:
    """The line that says why a stage failed: the stage's own exception, not DVC's generic last line.

    DVC ends every failed stage's log with ``ERROR: failed to reproduce ...``; the stage's Python
    traceback above it names the real cause (its final exception line).
    """
    lines = [line.rstrip() for line in log_text.splitlines() if line.strip()]
    headers = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if headers:
        for line in lines[headers[-1] + 1:]:
            if not line.startswith((" ", "\t")):
                return line
    errors = [line for line in lines if line.startswith("ERROR")]
    return errors[-1] if errors else (lines[-1] if lines else f"exit code {returncode}")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; ``transient`` says whether a retry may help."""

    def __init__(self, stage: str, returncode: int, log_path: Path, tail: str) -> None:
        self.stage, self.returncode, self.log_path, self.tail = stage, returncode, log_path, tail
        self.transient = any(m in tail for m in TRANSIENT_MARKERS)
        cause = failure_cause(tail, returncode)
        super().__init__(f"stage {stage!r} failed ({'transient' if self.transient else 'permanent'}): {cause}. "
                         f"Full log: {log_path}")

    def __reduce__(self) -> tuple[object, ...]:  # picklable (results may cross process boundaries)
        return (type(self), (self.stage, self.returncode, self.log_path, self.tail), self.__dict__)


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as dead."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def release_dead_dvc_locks(workspace: Path) -> list[int]:
    """Drop entries of dead processes from DVC's ``.dvc/tmp/rwlock``; return their pids.

    DVC releases entries of vanished pids itself, but a SIGKILLed stage can linger as a zombie
    when nothing reaps it (a container whose PID 1 is not an init), and DVC then reports the
    outputs as busy forever. Only call this while holding the workspace lock.
    """
    from cogalign_core.io import atomic_write_text

    path = workspace / ".dvc" / "tmp" / "rwlock"
    try:
        lock = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    dead: set[int] = set()
    for mode in ("read", "write"):
        entries = lock.get(mode) or {}
        for target in list(entries):
            infos = entries[target] if isinstance(entries[target], list) else [entries[target]]
            kept = [i for i in infos if _alive(int(i["pid"]))]
            dead.update(int(i["pid"]) for i in infos if i not in kept)
            if not kept:
                del entries[target]
            elif mode == "read":
                entries[target] = kept
    if dead:
        atomic_write_text(path, json.dumps(lock))
    return sorted(dead)


if __name__ == "__main__":
    import sys

    argv = sys.argv[1:]
    grace = 0.0
    if argv[:1] == ["--grace"] and len(argv) > 1:
        grace, argv = float(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m cogalign.processes [--grace SECONDS] -- COMMAND [ARGS...]")
    sys.exit(supervise(argv, grace))
