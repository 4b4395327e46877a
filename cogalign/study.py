"""``cogalign study``: every arm trained for N seeds as recorded DVC experiments, then one table.

1. ``cogalign run`` brings the workspace up to date and commits it (the data stages are then cached,
   so experiments only retrain and re-evaluate).
2. Per condition and seed, ``dvc exp run --queue -n <study>-<condition>-s<seed> -S model.seed=<seed>``
   (the cross-source condition adds ``-S model.train_exclude_datasets=[...]``); then
   ``dvc exp run --run-all`` executes the queue in temporary workspaces. Every seed is an experiment
   ref in the workspace's git repository (``dvc exp show``), its outputs in the DVC cache.
3. Each experiment's ``predictions.parquet`` is read back through ``dvc.api`` and pooled by
   :func:`cogalign_core.study.study_table`; ``studies/<name>/study.json`` and ``study.md`` are
   committed.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogalign.workspace import Workspace, WorkspaceError
from cogalign_core import contract
from cogalign_core.evaluate import scored_rows
from cogalign_core.io import atomic_write_json, atomic_write_text
from cogalign_core.study import render_markdown, study_table

STUDIES_DIR = Path("studies")
STANDARD = "standard"
PREDICTIONS = contract.PREDICTIONS


@dataclass(frozen=True)
class Condition:
    """One training condition: its name and the sources held out of training."""

    name: str
    held_out: tuple[str, ...] = ()

    def overrides(self, seed: int) -> list[str]:
        """``-S`` overrides of one experiment of this condition."""
        return [f"model.seed={seed}", f"model.train_exclude_datasets=[{','.join(self.held_out)}]"]


def conditions(cross_sources: Sequence[str]) -> list[Condition]:
    """The standard condition, then one cross-source condition per held-out source."""
    return [Condition(STANDARD), *(Condition(f"cross-{ds}", (ds,)) for ds in cross_sources)]


def experiment_name(study: str, condition: str, seed: int) -> str:
    return f"{study}-{condition}-s{seed}"


def _queue(ws: Workspace, study: str, conds: Sequence[Condition], seeds: Sequence[int]) -> list[str]:
    names = []
    for cond in conds:
        for seed in seeds:
            name = experiment_name(study, cond.name, seed)
            args = ["exp", "run", "--queue", "-n", name]
            for o in cond.overrides(seed):
                args += ["-S", o]
            ws.dvc(*args)
            names.append(name)
    return names


def _experiment_revs(ws: Workspace, names: Sequence[str]) -> dict[str, str]:
    """Experiment name -> commit, for the given names (failed experiments are absent)."""
    import dvc.api

    found: dict[str, str] = {}
    for row in dvc.api.exp_show(repo=str(ws.root), force=True):
        name = row.get("Experiment")
        rev = row.get("rev")
        if name in names and rev and not str(rev).startswith("workspace"):
            found[str(name)] = str(rev)
    return found


def _read_rows(ws: Workspace, rev: str) -> list[dict[str, Any]]:
    import dvc.api
    import pyarrow.parquet as pq

    with dvc.api.open(PREDICTIONS, repo=str(ws.root), rev=rev, mode="rb") as fh:
        table = pq.read_table(io.BytesIO(fh.read()))
    return scored_rows(table.to_pylist())


def run_study(workspace: str | Path, seeds: int, name: str | None = None, cross_sources: Sequence[str] = (),
              jobs: int = 1, n_resamples: int = 1000, wait: bool = False) -> Path:
    """Run the study and return the folder holding ``study.json`` and ``study.md``.

    Holds the workspace lock throughout (``wait``: wait for another command instead of refusing):
    the experiments start from the committed baseline, which nothing else may move meanwhile.
    """
    from cogalign.runner import workspace_lock

    if seeds < 1:
        raise WorkspaceError("--seeds must be at least 1")
    ws = Workspace.open(workspace)
    with workspace_lock(ws, wait=wait):
        return _run_study_locked(ws, seeds, name, cross_sources, jobs, n_resamples)


def _run_study_locked(ws: Workspace, seeds: int, name: str | None, cross_sources: Sequence[str], jobs: int,
                      n_resamples: int) -> Path:
    from cogalign.runner import run_pipeline

    study = name or time.strftime("study-%Y%m%d-%H%M%S")
    start = time.perf_counter()
    run_pipeline(ws.root)  # the baseline every experiment starts from, committed
    params = ws.params
    arms = list(params.evaluate.models)
    conds = conditions(cross_sources)
    seed_list = list(range(seeds))
    names = _queue(ws, study, conds, seed_list)
    ws.dvc("exp", "run", "--run-all", "--jobs", str(jobs))
    revs = _experiment_revs(ws, names)
    missing = [n for n in names if n not in revs]
    if missing:
        raise WorkspaceError(f"experiments did not finish: {', '.join(missing)} (see `dvc queue logs NAME`)")
    rows = {c.name: {s: _read_rows(ws, revs[experiment_name(study, c.name, s)]) for s in seed_list} for c in conds}
    table = study_table(rows, {c.name: c.held_out for c in conds}, arms, n_resamples=n_resamples,
                        seed=params.evaluate.seed)
    table.update({"study": study, "recipe": params.model.recipe, "experiments": revs,
                  "wall_seconds": round(time.perf_counter() - start, 1)})
    out = ws.root / STUDIES_DIR / study
    atomic_write_json(out / "study.json", table)
    title = f"CogAlign study {study} (recipe {params.model.recipe})"
    atomic_write_text(out / "study.md", render_markdown(table, title))
    ws.git("add", str((STUDIES_DIR / study).as_posix()))
    ws.git("commit", "-q", "-m", f"cogalign study {study}: {len(seed_list)} seeds x {len(conds)} conditions\n\n"
           + json.dumps(revs, indent=1))
    return out
