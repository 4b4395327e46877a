"""``cogalign study``: every arm trained for N seeds as recorded DVC experiments, then one table.

1. ``cogalign run --until counterfactual`` brings the data stages up to date and commits them (they
   are then cached, so experiments only train and evaluate; every model of the study is trained
   inside an experiment, none in the workspace itself).
2. Per condition and seed, one ``dvc exp run --temp -n <study>-<condition>-s<seed> -S model.seed=<seed>``
   (the cross-source condition adds ``-S model.train_exclude_datasets=[...]``), one after another in a
   temporary copy of the workspace. Every seed is an experiment ref in the workspace's git repository
   (``dvc exp show``), its outputs in the DVC cache. Experiments of the study that already exist on
   the current data commit are reused, so an interrupted study resumes where it stopped. (DVC's
   Celery queue, ``--queue`` + ``--run-all``, is not used: its file-system broker hangs after an
   experiment or two with a JSONDecodeError, DVC issues #10398 and #10428; it did here too.)
3. After each experiment, the table so far is written to ``.cogalign/studies/<name>/`` (progress,
   not versioned). At the end each experiment's ``predictions.parquet`` is read back through
   ``dvc.api`` and pooled by :func:`cogalign_core.study.study_table`; every arm's model of every
   experiment is reloaded from the DVC cache with the stock ``AutoModelForImageTextToText`` /
   ``AutoProcessor`` (recorded as ``reloaded``); ``studies/<name>/study.json`` and ``study.md`` are
   committed.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogalign.workspace import STATE_DIR, Workspace, WorkspaceError
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


def planned(study: str, conds: Sequence[Condition], seeds: Sequence[int], overrides: Sequence[str] = ()
            ) -> list[tuple[Condition, int, str, list[str]]]:
    """(condition, seed, experiment name, ``-S`` overrides) of every experiment, in run order."""
    return [(c, s, experiment_name(study, c.name, s), [*overrides, *c.overrides(s)]) for c in conds for s in seeds]


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


def _table(ws: Workspace, study: str, conds: Sequence[Condition], seeds: Sequence[int], arms: Sequence[str],
           revs: dict[str, str], n_resamples: int, seed: int) -> dict[str, Any]:
    """The study table over the experiments in ``revs`` (seeds without an experiment are left out)."""
    rows = {c.name: {s: _read_rows(ws, revs[experiment_name(study, c.name, s)]) for s in seeds
                     if experiment_name(study, c.name, s) in revs} for c in conds}
    rows = {c: by_seed for c, by_seed in rows.items() if by_seed}
    return study_table(rows, {c.name: c.held_out for c in conds}, arms, n_resamples=n_resamples, seed=seed)


def check_request(seeds: int, overrides: Sequence[str]) -> None:
    """Refuse a study request that cannot run: no seed, or an override of what the study sets itself."""
    if seeds < 1:
        raise WorkspaceError("--seeds must be at least 1")
    for o in overrides:
        if "=" not in o or o.split("=", 1)[0].strip() in ("model.seed", "model.train_exclude_datasets"):
            raise WorkspaceError(f"study override {o!r}: expected key.path=value, not the seed or held-out sources")


def run_study(workspace: str | Path, seeds: int, name: str | None = None, cross_sources: Sequence[str] = (),
              n_resamples: int = 1000, overrides: Sequence[str] = (), wait: bool = False) -> Path:
    """Run (or resume) the study and return the folder holding ``study.json`` and ``study.md``.

    ``overrides`` (``key.path=value``, DVC ``-S`` syntax) apply to every experiment and are recorded
    in the table (e.g. ``model.rl_max_steps=200``); seeds and held-out sources are set per experiment.
    Holds the workspace lock throughout (``wait``: wait for another command instead of refusing):
    the experiments start from the committed baseline, which nothing else may move meanwhile.
    """
    from cogalign.runner import workspace_lock

    check_request(seeds, overrides)
    ws = Workspace.open(workspace)
    with workspace_lock(ws, wait=wait):
        return _run_study_locked(ws, seeds, name, cross_sources, n_resamples, overrides)


def _run_study_locked(ws: Workspace, seeds: int, name: str | None, cross_sources: Sequence[str],
                      n_resamples: int, overrides: Sequence[str]) -> Path:
    from cogalign.runner import run_pipeline

    study = name or time.strftime("study-%Y%m%d-%H%M%S")
    start = time.perf_counter()
    run_pipeline(ws.root, until=COUNTERFACTUAL_STAGE)  # the data every experiment starts from, committed
    params = ws.params
    arms = list(params.evaluate.models)
    conds = conditions(cross_sources)
    seed_list = list(range(seeds))
    plan = planned(study, conds, seed_list, overrides)
    names = [n for _, _, n, _ in plan]
    revs = _experiment_revs(ws, names)
    reused = sorted(revs)
    progress = ws.root / STATE_DIR / "studies" / study
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    for _, _, exp, exp_overrides in plan:
        if exp in revs:
            continue
        t0 = time.perf_counter()
        args = ["exp", "run", "--temp", "-n", exp]
        for o in exp_overrides:
            args += ["-S", o]
        result = ws.dvc(*args, check=False)
        seconds[exp] = round(time.perf_counter() - t0, 1)
        revs = _experiment_revs(ws, names)
        if result.returncode != 0 or exp not in revs:
            failed[exp] = (result.stderr or result.stdout).strip()[-2000:]
            atomic_write_text(progress / f"{exp}.failed.txt", failed[exp] + "\n")
            continue
        partial = _table(ws, study, conds, seed_list, arms, revs, n_resamples, params.evaluate.seed)
        partial.update({"experiments": revs, "seconds": seconds, "planned": names})
        atomic_write_json(progress / "study.json", partial)
        atomic_write_text(progress / "study.md", render_markdown(
            partial, f"CogAlign study {study} (in progress: {len(revs)} of {len(names)} experiments)"))
    if failed:
        raise WorkspaceError(f"experiments failed: {', '.join(failed)} (errors in {progress}); rerun the same "
                             "command to resume")
    table = _table(ws, study, conds, seed_list, arms, revs, n_resamples, params.evaluate.seed)
    # Every arm's model of every experiment must reload from the cache with the stock Auto classes.
    reloaded = {n: {arm: reload_model(ws, rev, arm) for arm in arms} for n, rev in sorted(revs.items())}
    table.update({"study": study, "recipe": params.model.recipe, "overrides": list(overrides), "experiments": revs,
                  "reused_experiments": reused, "experiment_seconds": seconds, "reloaded": reloaded,
                  "wall_seconds": round(time.perf_counter() - start, 1)})
    out = ws.root / STUDIES_DIR / study
    atomic_write_json(out / "study.json", table)
    title = f"CogAlign study {study} (recipe {params.model.recipe})"
    atomic_write_text(out / "study.md", render_markdown(table, title))
    ws.git("add", str((STUDIES_DIR / study).as_posix()))
    ws.git("commit", "-q", "-m", f"cogalign study {study}: {len(seed_list)} seeds x {len(conds)} conditions\n\n"
           + json.dumps(revs, indent=1))
    return out
