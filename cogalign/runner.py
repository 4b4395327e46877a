"""``cogalign run``: lock the workspace, refresh code fingerprints, ask DVC what is stale, run the
flow on Prefect (a local server per process unless ``PREFECT_API_URL`` is set), then commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cogalign.workspace import RUNS_DIR, STATE_DIR, Workspace, WorkspaceError, os_error_text, workspace_lock
from cogalign_core import accounting, contract
from cogalign_core.config import PARAMS_FILE, PipelineParams
from cogalign_core.io import atomic_write_json, remove_stale_temps

__all__ = ["RunOutcome", "clean_after_kill", "is_up_to_date", "prepare_prefect_env", "run_pipeline",
           "workspace_lock"]

if TYPE_CHECKING:
    from cogalign.stage_worker import WorkerPool


@dataclass
class RunOutcome:
    """What a ``cogalign run`` did. ``revision`` is the commit this run made (None: no commit)."""

    up_to_date: bool
    flow_run_id: str | None = None
    revision: str | None = None
    stages: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0
    cleaned: list[str] = field(default_factory=list)
    report: accounting.RunReport = field(default_factory=accounting.RunReport)


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


def check_integrity(ws: Workspace) -> None:
    """Refuse to run on corrupted cache objects (fast check, :mod:`cogalign.integrity`): a stage must
    never read, and DVC never check out, data that no longer matches ``dvc.lock``."""
    from cogalign.integrity import verify

    report = verify(ws)
    if report.corrupt:
        raise WorkspaceError(f"{len(report.corrupt)} corrupted cache object(s) in {ws.root}; nothing was run:\n"
                             + report.summary(report.corrupt))


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
    start = time.perf_counter()
    with workspace_lock(ws, wait=wait):
        # Checked under the lock: an ingest in progress may be registering the first batch.
        if not ws.params.batches:
            raise WorkspaceError(f"{ws.root} has no raw batch yet: `cogalign ingest SOURCE --workspace {workspace}`")
        cleaned = clean_after_kill(ws)
        check_integrity(ws)
        if overrides:
            apply_overrides(ws, overrides)
        ws.update_fingerprints()
        prepare_prefect_env(ws)
        start_local_server(ws.root, prefect_home(ws))  # no wait: its start-up overlaps the status check
        with worker_pool(ws.root) as pool:
            if not (force or from_stage) and is_up_to_date(ws, until, pool):
                # An override no stage declares (e.g. registry.*) changes nothing to run but is still recorded.
                revision = (ws.commit("cogalign run: parameter overrides", [PARAMS_FILE])
                            if overrides and commit else None)
                return RunOutcome(up_to_date=True, revision=revision, seconds=time.perf_counter() - start,
                                  cleaned=cleaned, report=stage_report(ws, list(ws.lock_stages())))
            # While the server starts: DVC's graph (remembered for the flow) and Prefect's imports.
            pipeline_stages(ws.root)
            from cogalign.flows.pipeline import end_to_end

            try:
                with prefect_api(ws):
                    result = end_to_end(str(ws.root), until=until, from_stage=from_stage, force=force)
            except OSError as exc:  # a full or read-only disk under the run itself (logs, pid file, state)
                raise WorkspaceError(f"the run on {ws.root} stopped, nothing was committed: "
                                     f"{os_error_text(exc)}") from exc
        run_id = str(result["flow_run_id"])
        revision = None
        if commit:
            revision = ws.commit(f"cogalign run {run_id}\n\nflow-run-id: {run_id}")
        if push:
            from cogalign.workspace import push as dvc_push

            dvc_push(ws)
        # The run's own commit, never HEAD: HEAD may be another command's commit (or an older run's).
        outcome = RunOutcome(False, run_id, revision, list(result["stages"]), time.perf_counter() - start, cleaned,
                             stage_report(ws, [str(s["stage"]) for s in result["stages"]]))
        atomic_write_json(ws.root / RUNS_DIR / f"{run_id}.json", {
            "flow_run_id": run_id, "revision": revision or "no commit", "committed": revision is not None,
            "finished_unix": time.time(), "seconds": round(outcome.seconds, 2), "stages": outcome.stages,
            "until": until, "from_stage": from_stage, "force": force,
        })
        return outcome


def stage_report(ws: Workspace, stages: list[str]) -> accounting.RunReport:
    """Per-stage in/out/dropped lines and the warnings (empty batches, large drops) for ``stages``."""
    from cogalign_core.settings import load_settings

    return accounting.run_report(ws.root, stages, ws.params.batches, load_settings(ws.root).drop_warning_fraction)


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
    ws.write_params(overridden(ws.params, overrides))


def overridden(params: PipelineParams, overrides: dict[str, str]) -> PipelineParams:
    """``params`` with ``-S key.path=value`` overrides applied and validated (a WorkspaceError otherwise)."""
    import yaml

    data = params.model_dump(mode="json")
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
        return PipelineParams.model_validate(data)
    except ValueError as exc:
        raise WorkspaceError(f"invalid override: {exc}") from exc
