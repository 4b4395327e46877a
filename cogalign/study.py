"""``cogalign study``: every arm trained for N seeds as recorded DVC experiments, then one table.

1. ``cogalign run --until counterfactual`` brings the data stages up to date and commits them (they
   are then cached, so experiments only train and evaluate; every model of the study is trained
   inside an experiment, none in the workspace itself).
2. Per condition and seed, ``dvc exp run --queue -n <study>-<condition>-s<seed> -S model.seed=<seed>``
   (the cross-source condition adds ``-S model.train_exclude_datasets=[...]``); then
   ``dvc exp run --run-all`` executes the queue in temporary workspaces. Every seed is an experiment
   ref in the workspace's git repository (``dvc exp show``), its outputs in the DVC cache.
3. Each experiment's ``predictions.parquet`` is read back through ``dvc.api`` and pooled by
   :func:`cogalign_core.study.study_table`; every arm's model of every experiment is reloaded from
   the DVC cache with the stock ``AutoModelForImageTextToText`` / ``AutoProcessor`` (recorded as
   ``reloaded``); ``studies/<name>/study.json`` and ``study.md`` are committed.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogalign.workspace import Workspace, WorkspaceError
from cogalign_core import contract
from cogalign_core.counterfactual import STAGE as COUNTERFACTUAL_STAGE
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


def _queue(ws: Workspace, study: str, conds: Sequence[Condition], seeds: Sequence[int],
           overrides: Sequence[str] = ()) -> list[str]:
    names = []
    for cond in conds:
        for seed in seeds:
            name = experiment_name(study, cond.name, seed)
            args = ["exp", "run", "--queue", "-n", name]
            for o in [*overrides, *cond.overrides(seed)]:
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


def reload_model(ws: Workspace, rev: str, arm: str) -> str:
    """Reload ``arm``'s model folder (``contract.model_dir``) of experiment ``rev`` from the DVC cache with the
    stock Auto classes.

    Returns ``"<model class>/<processor class>"``; raises when the folder does not load.
    """
    from dvc.api import DVCFileSystem
    from transformers import AutoModelForImageTextToText, AutoProcessor

    fs = DVCFileSystem(str(ws.root), rev=rev)
    with tempfile.TemporaryDirectory(prefix="cogalign-study-") as tmp:
        fs.get(contract.model_dir(arm), str(Path(tmp) / "model"), recursive=True)
        folder = next(Path(tmp).rglob("config.json")).parent
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        return f"{type(model).__name__}/{type(processor).__name__}"


def run_study(workspace: str | Path, seeds: int, name: str | None = None, cross_sources: Sequence[str] = (),
              jobs: int = 1, n_resamples: int = 1000, overrides: Sequence[str] = ()) -> Path:
    """Run the study and return the folder holding ``study.json`` and ``study.md``.

    ``overrides`` (``key.path=value``, DVC ``-S`` syntax) apply to every experiment and are recorded
    in the table (e.g. ``model.rl_max_steps=200``); seeds and held-out sources are set per experiment.
    """
    from cogalign.runner import run_pipeline

    if seeds < 1:
        raise WorkspaceError("--seeds must be at least 1")
    ws = Workspace.open(workspace)
    study = name or time.strftime("study-%Y%m%d-%H%M%S")
    start = time.perf_counter()
    run_pipeline(ws.root, until=COUNTERFACTUAL_STAGE)  # the data every experiment starts from, committed
    params = ws.params
    arms = list(params.evaluate.models)
    conds = conditions(cross_sources)
    seed_list = list(range(seeds))
    if shutil.which("dvc", path=ws.env()["PATH"]) is None:
        # DVC's queue spawns its workers as a `dvc` command; without one they never start and the queue hangs.
        raise WorkspaceError("no `dvc` executable on PATH (the experiment queue's workers run it): install dvc "
                             "into this environment's bin directory")
    for o in overrides:
        if "=" not in o or o.split("=", 1)[0].strip() in ("model.seed", "model.train_exclude_datasets"):
            raise WorkspaceError(f"study override {o!r}: expected key.path=value, not the seed or held-out sources")
    names = _queue(ws, study, conds, seed_list, overrides)
    ws.dvc("exp", "run", "--run-all", "--jobs", str(jobs))
    revs = _experiment_revs(ws, names)
    missing = [n for n in names if n not in revs]
    if missing:
        raise WorkspaceError(f"experiments did not finish: {', '.join(missing)} (see `dvc queue logs NAME`)")
    rows = {c.name: {s: _read_rows(ws, revs[experiment_name(study, c.name, s)]) for s in seed_list} for c in conds}
    table = study_table(rows, {c.name: c.held_out for c in conds}, arms, n_resamples=n_resamples,
                        seed=params.evaluate.seed)
    # Every arm's model of every experiment must reload from the cache with the stock Auto classes.
    reloaded = {n: {arm: reload_model(ws, rev, arm) for arm in arms} for n, rev in sorted(revs.items())}
    table.update({"study": study, "recipe": params.model.recipe, "overrides": list(overrides), "experiments": revs,
                  "reloaded": reloaded,
                  "wall_seconds": round(time.perf_counter() - start, 1)})
    out = ws.root / STUDIES_DIR / study
    atomic_write_json(out / "study.json", table)
    title = f"CogAlign study {study} (recipe {params.model.recipe})"
    atomic_write_text(out / "study.md", render_markdown(table, title))
    ws.git("add", str((STUDIES_DIR / study).as_posix()))
    ws.git("commit", "-q", "-m", f"cogalign study {study}: {len(seed_list)} seeds x {len(conds)} conditions\n\n"
           + json.dumps(revs, indent=1))
    return out
