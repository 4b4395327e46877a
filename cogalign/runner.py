"""``cogalign run``: lock the workspace, refresh code fingerprints, ask DVC what is stale, run the
flow on Prefect (a local server per process unless ``PREFECT_API_URL`` is set), then commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cogalign.workspace import RUNS_DIR, STATE_DIR, Workspace, WorkspaceError
from cogalign_core import contract
from cogalign_core.io import atomic_write_json, remove_stale_temps

if TYPE_CHECKING:
    from cogalign.stage_worker import WorkerPool

LOCK_FILE = STATE_DIR / "run.lock"


@dataclass
class RunOutcome:
    """What a ``cogalign run`` did."""

    up_to_date: bool
    flow_run_id: str | None = None
    revision: str | None = None
    stages: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0
    cleaned: list[str] = field(default_factory=list)


@contextlib.contextmanager
def workspace_lock(ws: Workspace, wait: bool = False) -> Iterator[None]:
    """Exclusive lock for one run per workspace (released by the kernel if the process dies)."""
    path = ws.root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise WorkspaceError(f"another cogalign run ({holder}) is working on {ws.root}; "
                                 "wait for it or pass --wait") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def prefect_home(ws: Workspace) -> Path:
    """The workspace's Prefect home (its local server's database, Prefect's local settings)."""
    return ws.root / STATE_DIR / "prefect"


def prepare_prefect_env(ws: Workspace) -> None:
    """Prefect settings for a run: a per-workspace home unless a server is configured, analytics off,
    INFO logs (stage progress lines) to the API but only warnings on the console.

    Must run before ``prefect`` is imported: its settings and logging are read at import time.
    """
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(prefect_home(ws)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The default 20 s is too short on a busy 2-core machine (the server imports a lot).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


@contextlib.contextmanager
def prefect_api(ws: Workspace) -> Iterator[str]:
    """Prefect configured for ``ws`` and its API reachable inside the block (see ``cogalign.prefect_server``)."""
    from cogalign import prefect_server

    prepare_prefect_env(ws)
    with prefect_server.prefect_api(ws.root, prefect_home(ws)) as url:
        yield url


def is_up_to_date(ws: Workspace, until: str | None = None, pool: WorkerPool | None = None) -> bool:
    """True when ``dvc status`` reports no changed stage (up to ``until`` and its upstream, if given).

    With ``pool`` the question goes to one of the run's DVC workers, which then runs the first
    stage with its imports and caches already warm.
    """
    argv = ["status", "--json", *(["--with-deps", until] if until else [])]
    if pool is None:
        out = ws.dvc(*argv).stdout
    else:
        with tempfile.TemporaryDirectory(prefix="cogalign-status-") as tmp:
            stdout, stderr = Path(tmp) / "out.json", Path(tmp) / "err.txt"
            if pool.run(argv, stdout, stderr, ws.env()) != 0:
                raise WorkspaceError(f"`dvc status` failed in {ws.root}:\n{stderr.read_text(errors='replace')}")
            out = stdout.read_text()
    return (json.loads(out or "{}") or {}) == {}


def clean_after_kill(ws: Workspace) -> list[str]:
    """Remove what a killed run can leave: its process groups (stage workers, a Prefect server), DVC
    lock entries of dead processes, and temp files under data/."""
    from cogalign.processes import kill_stale_groups, release_dead_dvc_locks

    cleaned = kill_stale_groups(ws.root)
    cleaned += [f"DVC lock of dead process {pid}" for pid in release_dead_dvc_locks(ws.root)]
    cleaned += [str(p.relative_to(ws.root)) for p in remove_stale_temps(ws.root / contract.DATA)]
    return cleaned


def run_pipeline(workspace: str | os.PathLike[str], until: str | None = None, from_stage: str | None = None,
                 force: bool = False, commit: bool = True, wait: bool = False,
                 overrides: dict[str, str] | None = None, push: bool = False) -> RunOutcome:
    """Run the pipeline once; see :func:`cogalign.flows.pipeline.end_to_end`.

    Fixed costs overlap: the local Prefect server (when none is configured) starts while a DVC
    worker answers ``dvc status``; an up-to-date workspace never waits for the server.
    """
    from cogalign.dag import pipeline_stages
    from cogalign.prefect_server import start_local_server
    from cogalign.stage_worker import worker_pool

    ws = Workspace.open(workspace)
    if not ws.params.batches:
        raise WorkspaceError(f"{ws.root} has no raw batch yet: `cogalign ingest SOURCE --workspace {workspace}`")
    start = time.perf_counter()
    with workspace_lock(ws, wait=wait):
        cleaned = clean_after_kill(ws)
        if overrides:
            apply_overrides(ws, overrides)
        ws.update_fingerprints()
        prepare_prefect_env(ws)
        start_local_server(ws.root, prefect_home(ws))  # no wait: its start-up overlaps the status check
        with worker_pool(ws.root) as pool:
            if not (force or from_stage) and is_up_to_date(ws, until, pool):
                return RunOutcome(up_to_date=True, seconds=time.perf_counter() - start, cleaned=cleaned)
            # While the server starts: DVC's graph (remembered for the flow) and Prefect's imports.
            pipeline_stages(ws.root)
            from cogalign.flows.pipeline import end_to_end

            with prefect_api(ws):
                result = end_to_end(str(ws.root), until=until, from_stage=from_stage, force=force)
        run_id = str(result["flow_run_id"])
        revision = None
        if commit:
            revision = ws.commit(f"cogalign run {run_id}\n\nflow-run-id: {run_id}")
        if push:
            from cogalign.workspace import push as dvc_push

            dvc_push(ws)
        outcome = RunOutcome(False, run_id, revision or ws.revision(), list(result["stages"]),
                             time.perf_counter() - start, cleaned)
        atomic_write_json(ws.root / RUNS_DIR / f"{run_id}.json", {
            "flow_run_id": run_id, "revision": outcome.revision, "committed": revision is not None,
            "finished_unix": time.time(), "seconds": round(outcome.seconds, 2), "stages": outcome.stages,
            "until": until, "from_stage": from_stage, "force": force,
        })
        return outcome


def previous_stage_seconds(ws: Workspace) -> dict[str, float]:
    """Each stage's time in the latest run record that ran it (the scheduler starts the longest chain first)."""
    seconds: dict[str, float] = {}
    for path in sorted((ws.root / RUNS_DIR).glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            stages = json.loads(path.read_text()).get("stages") or []
        except (OSError, ValueError):
            continue
        seconds.update({str(s["stage"]): float(s["seconds"]) for s in stages if s.get("ran")})
    return seconds


def apply_overrides(ws: Workspace, overrides: dict[str, str]) -> None:
    """Apply ``-S key.path=value`` overrides to params.yaml (validated; YAML-typed values)."""
    import yaml

    from cogalign_core.config import PipelineParams

    data = ws.params.model_dump(mode="json")
    for key, raw in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise WorkspaceError(f"-S {key}: {p!r} is not a params section")
            node = node[p]
        if parts[-1] not in node:
            raise WorkspaceError(f"-S {key}: unknown parameter {parts[-1]!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    try:
        ws.write_params(PipelineParams.model_validate(data))
    except ValueError as exc:
        raise WorkspaceError(f"invalid override: {exc}") from exc
