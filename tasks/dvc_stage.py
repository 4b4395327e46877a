"""The one Prefect task type: run a single DVC stage in a child process.

DVC alone decides whether the stage runs (its own cache and ``dvc.lock``), so the Prefect side
uses no result cache. The child runs in its own process group, dies with its parent
(``PR_SET_PDEATHSIG``) and is recorded in a pid file, so a killed run leaves no orphan holding
the DVC lock: the next run ends any recorded group before starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cogalign.processes import PID_FILE, StageFailed, die_with_parent
from cogalign.tasks.gpu import SIMULATED_ENV, GpuAllocator


@dataclass
class StageResult:
    stage: str
    ran: bool
    seconds: float
    devices: str
    log_path: str


def run_stage_process(workspace: Path, stage: str, devices: str, log_path: Path, env: dict[str, str],
                      force: bool = False) -> bool:
    """Run ``dvc repro --single-item STAGE``; return True when DVC actually ran the command."""
    env = dict(env)
    env["CUDA_VISIBLE_DEVICES"] = devices
    # A stage that allocates (or launches accelerate) itself must see only its own slots too.
    env[SIMULATED_ENV] = devices
    # The supervisor leads the stage's process group and kills it when this process dies.
    cmd = [sys.executable, "-m", "cogalign.processes", "--", sys.executable, "-m", "dvc", "repro",
           "--single-item", stage]
    if force:
        cmd.append("--force")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        (workspace / PID_FILE).parent.mkdir(parents=True, exist_ok=True)
        (workspace / PID_FILE).write_text(json.dumps({"pgid": proc.pid, "stage": stage}))
        try:
            returncode = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            (workspace / PID_FILE).unlink(missing_ok=True)
    text = log_path.read_text(errors="replace")
    if returncode != 0:
        raise StageFailed(stage, returncode, log_path, text[-4000:])
    return "didn't change, skipping" not in text and "is cached - skipping" not in text


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
    (:data:`TRANSIENT_MARKERS`, e.g. CUDA out of memory or a busy lock); permanent failures
    stop the flow at once.
    """
    from cogalign.workspace import Workspace

    ws = Workspace.open(workspace)
    start = time.perf_counter()
    with allocator().acquire(gpus) as devices:
        log_path = Path(log_dir) / f"{stage.replace('@', '_')}.log"
        ran = run_stage_process(ws.root, stage, devices, log_path, ws.env(), force=force)
    return asdict(StageResult(stage, ran, round(time.perf_counter() - start, 2), devices or "cpu", str(log_path)))
