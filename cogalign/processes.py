"""Stage child processes: die with the parent, and clean up after a killed run (no Prefect import).

A stage runs as ``python -m cogalign.processes -- dvc repro ...``: this module is the leader of the
stage's process group. The kernel signals it when the run that started it dies (even by SIGKILL),
and it then kills the whole group, so the stage command DVC started (a grandchild of the run,
which ``PR_SET_PDEATHSIG`` alone would not reach) never outlives the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
from pathlib import Path

PID_FILE = Path(".cogalign/stage.pid")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In the child, before exec: receive ``sig`` when the parent dies (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)


LOG_RESERVE = 64 * 1024   # bytes of a stage log allocated before the stage starts
LOG_TAIL = 16 * 1024      # the last bytes of a stage's output kept in memory


class _StageLog:
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
        """Cut the unused reserve; after a lost write, put the kept tail where it fits."""
        if not self.is_file:
            return
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


def supervise(cmd: list[str]) -> int:
    """Run ``cmd`` inside this process group; kill the whole group if our parent dies.

    Must run as the group leader (started with ``start_new_session``). The command's output goes
    to our stdout through :class:`_StageLog`. Returns ``cmd``'s exit code.
    """
    import subprocess

    parent = os.getppid()
    log = _StageLog(1)

    def kill_group(signum: int, frame: object) -> None:
        log.close()
        os.killpg(os.getpgid(0), signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, kill_group)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        kill_group(signal.SIGTERM, None)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            log.write(chunk)
        return proc.wait()
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


def kill_stale_stage(workspace: Path) -> int | None:
    """End a stage process group left by a killed run (from the pid file); return its pgid.

    The group leader is the supervisor of the ``dvc repro`` child; the stage command DVC started is in the same
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


if __name__ == "__main__":
    import sys

    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m cogalign.processes -- COMMAND [ARGS...]")
    sys.exit(supervise(argv))


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
