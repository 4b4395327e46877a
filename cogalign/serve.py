"""``cogalign serve``: run a workspace's ``prefect.yaml`` deployments from this process.

The deployments (names, entrypoints, parameters, schedules) are read from the workspace's
``prefect.yaml``, so ``prefect deploy --all`` + a ``process`` worker and ``cogalign serve`` run the
same thing. ``serve`` needs no work pool: Prefect's runner polls the server named by
``PREFECT_API_URL`` and starts each flow run as a child process of this one.

The ``end-to-end`` deployment's entrypoint is :func:`run_workspace`, which does what
``cogalign run`` does (workspace lock, cleanup after a killed run, code fingerprints, git
commit) around the pipeline flow, so a scheduled run and an operator's run never collide.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from cogalign.workspace import Workspace, WorkspaceError

DEFAULT_DROP_FOLDER = "drop"
_ENV_TEMPLATE = re.compile(r"^\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


@flow(name="cogalign-run", log_prints=True)
def run_workspace(workspace: str, recipe: str | None = None, until: str | None = None,
                  from_stage: str | None = None, force: bool = False, wait: bool = True) -> dict[str, object]:
    """Deployed ``cogalign run``: lock, clean after a killed run, run the pipeline flow, commit.

    Args:
        workspace: workspace directory (on the worker's machine).
        recipe: switch ``params.model.recipe`` first (recorded like any ``-S`` override).
        until / from_stage / force: as for ``cogalign run``.
        wait: wait for another run holding the workspace lock instead of failing.

    Returns:
        ``{"up_to_date", "flow_run_id", "revision", "stages"}`` (``stages`` as in ``cogalign run``).
    """
    from cogalign.runner import run_pipeline

    overrides = {"model.recipe": recipe} if recipe else None
    outcome = run_pipeline(workspace, until=until, from_stage=from_stage, force=force, wait=wait,
                           overrides=overrides)
    if outcome.cleaned:
        print(f"cleaned after an interrupted run: {', '.join(outcome.cleaned)}")
    return {"up_to_date": outcome.up_to_date, "flow_run_id": outcome.flow_run_id, "revision": outcome.revision,
            "stages": outcome.stages}


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of ``prefect.yaml`` with its templates resolved."""

    name: str
    entrypoint: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    work_pool: str | None = None


def _resolve(value: Any, env: dict[str, str]) -> Any:
    """Replace ``"{{ $VAR }}"`` values (Prefect's env-var template) with ``env[VAR]`` (None if unset)."""
    if isinstance(value, str) and (m := _ENV_TEMPLATE.match(value.strip())):
        return env.get(m.group(1))
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    return value


def template_env(ws: Workspace, drop_folder: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment used to resolve ``prefect.yaml`` templates: the process env plus workspace paths."""
    env = dict(os.environ)
    env["COGALIGN_WORKSPACE"] = str(ws.root)
    if drop_folder is not None:
        env["COGALIGN_DROP_FOLDER"] = str(Path(drop_folder).resolve())
    else:
        env.setdefault("COGALIGN_DROP_FOLDER", str(ws.root / DEFAULT_DROP_FOLDER))
    return env


def read_deployments(ws: Workspace, drop_folder: str | os.PathLike[str] | None = None) -> list[DeploymentSpec]:
    """The deployments of ``<workspace>/prefect.yaml``, templates resolved for this workspace."""
    path = ws.root / "prefect.yaml"
    if not path.exists():
        raise WorkspaceError(f"{path} not found: re-create it from the template (cogalign init writes it)")
    doc = yaml.safe_load(path.read_text()) or {}
    env = template_env(ws, drop_folder)
    specs = []
    for d in doc.get("deployments") or []:
        if not d.get("name") or not d.get("entrypoint"):
            raise WorkspaceError(f"{path}: every deployment needs a name and an entrypoint, got {d!r}")
        specs.append(DeploymentSpec(
            name=d["name"], entrypoint=d["entrypoint"], description=d.get("description") or "",
            parameters=_resolve(d.get("parameters") or {}, env),
            schedules=tuple(d.get("schedules") or ()),
            work_pool=(d.get("work_pool") or {}).get("name")))
    return specs


def load_entrypoint(entrypoint: str) -> Any:
    """Import ``package.module:flow_function`` (the module-path form used in ``prefect.yaml``)."""
    module_name, sep, attr = entrypoint.partition(":")
    if not sep:
        raise WorkspaceError(f"entrypoint {entrypoint!r} must look like package.module:flow")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise WorkspaceError(f"cannot load entrypoint {entrypoint!r}: {exc}") from exc


def runner_deployments(ws: Workspace, names: list[str] | None = None,
                       drop_folder: str | os.PathLike[str] | None = None) -> list[Any]:
    """``RunnerDeployment`` objects for the selected deployments (all when ``names`` is empty)."""
    from prefect.flows import EntrypointType
    from prefect.schedules import Cron

    specs = read_deployments(ws, drop_folder)
    known = {s.name for s in specs}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise WorkspaceError(f"no deployment {', '.join(unknown)} in prefect.yaml; known: {', '.join(sorted(known))}")
    out = []
    for spec in specs:
        if names and spec.name not in names:
            continue
        fn = load_entrypoint(spec.entrypoint)
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in spec.schedules if "cron" in s]
        out.append(fn.to_deployment(name=spec.name, description=spec.description, parameters=spec.parameters,
                                    schedules=schedules or None, entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def serve_workspace(workspace: str | os.PathLike[str], names: list[str] | None = None,
                    drop_folder: str | os.PathLike[str] | None = None) -> None:
    """Register the workspace's deployments on ``PREFECT_API_URL`` and execute their runs (blocks)."""
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise WorkspaceError("PREFECT_API_URL is not set: start a server (`prefect server start --host "
                                 "127.0.0.1 --port 4200`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect import serve

    ws = Workspace.open(workspace)
    deployments = runner_deployments(ws, names, drop_folder)
    serve(*deployments, print_starting_message=True)
