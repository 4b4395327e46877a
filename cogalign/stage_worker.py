"""Long-lived DVC processes that run one DVC command at a time for a run (no Prefect import).

A ``dvc repro`` child per stage starts an interpreter, imports DVC and warms its caches each time
(0.5 s idle, several seconds on a loaded machine). A worker pays that once per run and then calls
DVC's own command line (``dvc.cli.main``) in-process for each request, so DVC stays the only judge
of what is stale, with the same locks, messages, ``dvc.lock`` and exit codes as ``dvc repro``.
Several workers run stages side by side the way several ``dvc repro`` processes would: each is its
own process, and ``--wait-for-lock`` makes one wait for another's short repository-lock sections
(DVC releases the lock while a stage command runs).

A worker leads its own process group (the stage commands DVC starts join it), kills that group when
the run that started it dies (``cogalign.processes.lead_group``) and is recorded in the workspace's
group records, so a later run ends one that outlived a killed run.

Protocol: one JSON request per line on the worker's stdin
``{"argv": [...], "stdout": path, "stderr": path, "env": {...}}``; the worker points its file
descriptors 1 and 2 at those files (the stage command inherits them), replaces its environment,
runs ``dvc.cli.main(argv)`` and answers ``{"rc": N}`` on its original stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cogalign.processes import StageLog, end_group, forget_group, lead_group, record_group

ROLE = "dvc-worker"


class WorkerDied(RuntimeError):
    """The worker process ended while it was running a request."""

    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode if returncode is not None else -1
        super().__init__(f"DVC worker process ended (exit code {self.returncode})")


class DvcWorker:
    """One worker process for ``workspace``; runs one request at a time.

    ``warm``: import DVC's modules and build the index before the first request (for a worker
    started ahead of need; a worker asked right away would only delay its answer).
    """

    def __init__(self, workspace: Path, warm: bool = False) -> None:
        self.workspace = workspace
        argv = [sys.executable, "-m", "cogalign.stage_worker", *(["--warm"] if warm else [])]
        self.proc = subprocess.Popen(argv, cwd=workspace,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # arms its own parent-death signal
        record_group(workspace, self.proc.pid, ROLE)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, argv: list[str], stdout: Path, stderr: Path | None, env: dict[str, str],
             on_wait: Callable[[], None] | None = None, interval: float = 1.0) -> int:
        """Run ``dvc ARGV`` in the worker; output goes to ``stdout``/``stderr`` (one file when ``stderr`` is None).

        ``on_wait`` is called about every ``interval`` seconds while the command runs.
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"argv": argv, "stdout": str(stdout), "stderr": str(stderr or stdout), "env": env}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerDied(self.proc.wait()) from None
        while True:
            readable, _, _ = select.select([self.proc.stdout], [], [], interval)
            if readable:
                line = self.proc.stdout.readline()
                if not line:
                    raise WorkerDied(self.proc.wait())
                return int(json.loads(line)["rc"])
            if on_wait is not None:
                on_wait()

    def stop(self) -> None:
        """End the worker and every process in its group."""
        end_group(self.proc, grace=2.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        forget_group(self.workspace, self.proc.pid)


class WorkerPool:
    """Idle workers of one workspace, handed out one per concurrent DVC command.

    With ``keep_spare`` (the flow sets it) a worker is started in the background whenever the last
    idle one is taken, so a stage that starts next to a running one finds a warm worker too.
    Workers are started from one dedicated thread that lives as long as the pool: the kernel's
    parent-death signal follows the thread that started a process, and task threads come and go.
    """

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.keep_spare = False
        self._idle: list[DvcWorker] = []
        self._all: list[DvcWorker] = []
        self._lock = threading.Lock()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvc-worker-spawner")
        self._closed = False
        self.started = 0

    def _spawn(self, warm: bool = False) -> DvcWorker:
        worker = self._spawner.submit(DvcWorker, self.workspace, warm).result()
        with self._lock:
            self._all.append(worker)
            self.started += 1
        return worker

    def _spawn_spare(self) -> None:
        with self._lock:
            if self._closed or self._idle:
                return
        worker = self._spawn(warm=True)
        with self._lock:
            self._idle.append(worker)

    @contextlib.contextmanager
    def worker(self) -> Iterator[DvcWorker]:
        """A worker for one command; one that failed mid-command (or was interrupted) is not reused."""
        with self._lock:
            while self._idle and not self._idle[-1].alive():
                self._discard(self._idle.pop())
            worker = self._idle.pop() if self._idle else None
            spare = self.keep_spare and not self._idle and not self._closed
        if worker is None:
            worker = self._spawn()
        if spare:
            threading.Thread(target=self._spawn_spare, name="dvc-worker-spare", daemon=True).start()
        try:
            yield worker
        except BaseException:
            self._discard(worker)
            raise
        with self._lock:
            if worker.alive() and not self._closed:
                self._idle.append(worker)
                return
        self._discard(worker)

    def run(self, argv: list[str], stdout: Path, stderr: Path | None, env: dict[str, str],
            on_wait: Callable[[], None] | None = None, interval: float = 1.0) -> int:
        with self.worker() as worker:
            return worker.call(argv, stdout, stderr, env, on_wait, interval)

    def _discard(self, worker: DvcWorker) -> None:
        worker.stop()
        with contextlib.suppress(ValueError):
            self._all.remove(worker)

    def close(self) -> None:
        """Stop every worker (idle or busy) and the spawner thread."""
        with self._lock:
            self._closed = True
            workers, self._idle, self._all = list(self._all), [], []
        for worker in workers:
            worker.stop()
        self._spawner.shutdown(wait=False)


_POOLS: dict[Path, tuple[WorkerPool, int]] = {}
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def worker_pool(workspace: Path) -> Iterator[WorkerPool]:
    """The pool of ``workspace`` for this process: opened by the outermost caller, closed when it exits.

    ``cogalign run`` opens it around its staleness check and the flow, so the worker that answered
    ``dvc status`` (its imports and caches warm) runs the first stage; the flow's tasks find it here.
    """
    key = workspace.resolve()
    with _POOLS_LOCK:
        pool, users = _POOLS.get(key, (None, 0))
        if pool is None:
            pool = WorkerPool(key)
        _POOLS[key] = (pool, users + 1)
    try:
        yield pool
    finally:
        with _POOLS_LOCK:
            pool, users = _POOLS[key]
            if users <= 1:
                del _POOLS[key]
                pool.close()
            else:
                _POOLS[key] = (pool, users - 1)


def _redirect(stdout: str, stderr: str) -> Callable[[], None]:
    """Point file descriptors 1 and 2 at the request's files; return the function that ends the redirection.

    A single log file (a stage's log) is fed through a pipe into :class:`cogalign.processes.StageLog`,
    so a stage that fails on a full disk still leaves its exception at the end of its log.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if stderr != stdout:
        with open(stdout, "ab") as out:
            os.dup2(out.fileno(), 1)
        with open(stderr, "ab") as err:
            os.dup2(err.fileno(), 2)
        return lambda: None
    log_fd = os.open(stdout, os.O_WRONLY | os.O_CREAT, 0o644)
    os.lseek(log_fd, 0, os.SEEK_END)  # appends without O_APPEND, which would defeat the reserve
    log = StageLog(log_fd)
    read_end, write_end = os.pipe()

    def pump() -> None:
        while chunk := os.read(read_end, 1 << 16):
            log.write(chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def end() -> None:
        # Called after fds 1 and 2 point elsewhere: EOF comes once the stage's processes are gone.
        thread.join(timeout=30)
        log.close()
        os.close(log_fd)
        if not thread.is_alive():
            os.close(read_end)

    return end


def _warm_up() -> None:
    """Import what ``repro`` and ``status`` use and build the index once, so a worker started ahead of
    need answers its first request as fast as the next ones (DVC imports most modules lazily)."""
    with contextlib.suppress(Exception):  # a broken dvc.yaml is reported by the first real request
        import dvc.commands.repro
        import dvc.commands.status
        import dvc.repo.reproduce
        import dvc.stage.cache
        import dvc.stage.run  # noqa: F401
        from dvc.repo import Repo

        with Repo() as repo:
            _ = repo.index.graph


def serve(warm: bool = False) -> None:
    """Worker main loop: read requests from stdin, answer on the original stdout."""
    lead_group()
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    from dvc.cli import main as dvc_main

    if warm:
        _warm_up()
    for line in requests:
        request = json.loads(line)
        end_redirect = _redirect(request["stdout"], request["stderr"])
        os.environ.clear()
        os.environ.update(request["env"])
        try:
            rc = int(dvc_main(list(request["argv"])) or 0)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # DVC handles its own errors; anything else is reported like a crash
            import traceback

            traceback.print_exc()
            rc = 255
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            end_redirect()
        os.write(replies, (json.dumps({"rc": rc}) + "\n").encode())


if __name__ == "__main__":
    serve(warm="--warm" in sys.argv[1:])
