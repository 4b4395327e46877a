"""``cogalign run``: lock the workspace, refresh code fingerprints, ask DVC what is stale, run the
flow on Prefect (an ephemeral local server unless ``PREFECT_API_URL`` is set), then commit.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from cogalign.workspace import RUNS_DIR, STATE_DIR, Workspace, WorkspaceError, os_error_text, workspace_lock
from cogalign_core import accounting, contract
from cogalign_core.config import PARAMS_FILE, PipelineParams
from cogalign_core.io import atomic_write_json, remove_stale_temps

__all__ = ["RunOutcome", "clean_after_kill", "is_up_to_date", "prepare_prefect_env", "run_pipeline",
           "workspace_lock"]


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


def prepare_prefect_env(ws: Workspace) -> None:
    """Point Prefect at a per-workspace home with analytics off, unless a server is configured.

    Must run before ``prefect`` is imported: its settings are read at import time.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    os.environ.setdefault("PREFECT_HOME", str(ws.root / STATE_DIR / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # The default 20 s is too short on a busy 2-core machine (the server imports a lot).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


def is_up_to_date(ws: Workspace, until: str | None = None) -> bool:
    """True when ``dvc status`` reports no changed stage (up to ``until`` and its upstream, if given)."""
    out = ws.dvc("status", "--json", *(["--with-deps", until] if until else []))
    return (json.loads(out.stdout or "{}") or {}) == {}


def clean_after_kill(ws: Workspace) -> list[str]:
    """Remove what a killed run can leave: a stage process group and temp files under data/."""
    from cogalign.processes import kill_stale_stage, release_dead_dvc_locks

    cleaned = []
    pgid = kill_stale_stage(ws.root)
    if pgid is not None:
        cleaned.append(f"process group {pgid}")
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
    """Run the pipeline once; see :func:`cogalign.flows.pipeline.end_to_end`."""
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
        if not (force or from_stage) and is_up_to_date(ws, until):
            # An override no stage declares (e.g. registry.*) changes nothing to run but is still recorded.
            revision = ws.commit("cogalign run: parameter overrides", [PARAMS_FILE]) if overrides and commit else None
            return RunOutcome(up_to_date=True, revision=revision, seconds=time.perf_counter() - start,
                              cleaned=cleaned, report=stage_report(ws, list(ws.lock_stages())))
        prepare_prefect_env(ws)
        from cogalign.flows.pipeline import end_to_end

        try:
            result = end_to_end(str(ws.root), until=until, from_stage=from_stage, force=force)
        except OSError as exc:  # a full or read-only disk under the run itself (logs, pid file, state)
            raise WorkspaceError(f"the run on {ws.root} stopped, nothing was committed: {os_error_text(exc)}") from exc
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
