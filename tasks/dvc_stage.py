"""The one Prefect task type: reproduce a single DVC stage (``dvc repro --single-item``).

DVC alone decides whether the stage runs (its own cache and ``dvc.lock``), so the Prefect side
uses no result cache. The command runs in one of the run's DVC worker processes
(``cogalign.stage_worker``): each leads its own process group, which the stage command joins,
and dies with the run; a killed run's leftovers are ended by the next run. While the stage runs,
its progress file is read every second: changes go to the operator's display and, every
``COGALIGN_PROGRESS_INTERVAL`` seconds, a plain line to this task's Prefect log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cogalign.processes import StageFailed
from cogalign.progress import BOARD, StageProgressFeed
from cogalign.stage_worker import WorkerDied, worker_pool
from cogalign.tasks.gpu import SIMULATED_ENV, GpuAllocator
from cogalign_core.progress import PROGRESS_ENV


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "up to date"
    ran: bool
    seconds: float  # the stage itself, from getting its devices to DVC's answer
    waited: float  # seconds spent waiting for GPU slots
    devices: str
    started_unix: float
    finished_unix: float
    log_path: str


def stage_file(log_dir: Path, stage: str, suffix: str) -> Path:
    """``<log_dir>/<stage>.<suffix>`` with the foreach ``@`` made file-name safe."""
    return log_dir / f"{stage.replace('@', '_')}.{suffix}"


def run_stage_process(workspace: Path, stage: str, devices: str, log_path: Path, env: dict[str, str],
                      force: bool = False, progress_path: Path | None = None,
                      on_wait: Callable[[], None] | None = None) -> bool:
    """``dvc repro --single-item STAGE`` in a worker; return True when DVC actually ran the command.

    The stage sees only ``devices`` (``CUDA_VISIBLE_DEVICES``, and the simulated list for a stage that
    allocates or launches ``accelerate`` itself) and writes its progress to ``progress_path``.
    """
    env = dict(env)
    env["CUDA_VISIBLE_DEVICES"] = devices
    env[SIMULATED_ENV] = devices
    if progress_path is not None:
        progress_path.unlink(missing_ok=True)
        env[PROGRESS_ENV] = str(progress_path)
    argv = ["--wait-for-lock", "repro", "--single-item", stage, *(["--force"] if force else [])]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    with worker_pool(workspace) as pool:  # the run's pool when one is open
        try:
            returncode = pool.run(argv, log_path, None, env, on_wait=on_wait, interval=_poll_interval())
        except WorkerDied as exc:
            returncode = exc.returncode
    text = log_path.read_text(errors="replace")
    if returncode != 0:
        raise StageFailed(stage, returncode, log_path, text[-4000:])
    return "didn't change, skipping" not in text and "is cached - skipping" not in text


def _poll_interval() -> float:
    from cogalign.progress import progress_interval

    return min(1.0, progress_interval())


def _retry_transient(task: object, task_run: object, state: object) -> bool:
    try:
        state.result()  # type: ignore[attr-defined]
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return False
    return False


_ALLOCATOR: GpuAllocator | None = None


def allocator() -> GpuAllocator:
    """The process-wide allocator (created on first use, after the environment is final)."""
    global _ALLOCATOR
    if _ALLOCATOR is None:
        _ALLOCATOR = GpuAllocator()
    return _ALLOCATOR


@task(name="dvc-stage", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_retry_transient, task_run_name="{stage}")
def dvc_stage(workspace: str, stage: str, gpus: int, log_dir: str, force: bool = False) -> dict[str, object]:
    """Prefect task: one DVC stage, pinned to ``gpus`` GPUs when the machine has them.

    Retry policy: up to 2 retries (after 5 s, then 30 s) only for transient failures
    (:data:`cogalign.processes.TRANSIENT_MARKERS`, e.g. CUDA out of memory or a busy lock); permanent
    failures stop the stage at once.
    """
    from cogalign.workspace import Workspace

    ws = Workspace.open(workspace)
    logger = get_run_logger()
    queued = time.perf_counter()
    with allocator().acquire(gpus) as devices:
        waited = time.perf_counter() - queued
        started_unix, start = time.time(), time.perf_counter()
        log_path = stage_file(Path(log_dir), stage, "log")
        feed = StageProgressFeed(stage, stage_file(Path(log_dir), stage, "progress.json"), log=logger.info)
        BOARD.started(stage, devices or "cpu")
        try:
            ran = run_stage_process(ws.root, stage, devices, log_path, ws.env(), force=force,
                                    progress_path=feed.path, on_wait=feed.poll)
        except BaseException:
            BOARD.finished(stage, "failed", time.perf_counter() - start)
            raise
        seconds = time.perf_counter() - start
        if ran:
            feed.final()
        BOARD.finished(stage, "ran" if ran else "up to date", seconds)
    return asdict(StageResult(stage, "ran" if ran else "up to date", ran, round(seconds, 2), round(waited, 2),
                              devices or "cpu", started_unix, time.time(), str(log_path)))
