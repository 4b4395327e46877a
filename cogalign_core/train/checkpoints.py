"""Training checkpoints a killed stage resumes from, kept where DVC does not wipe them.

DVC deletes a stage's outputs before it reruns the stage, so checkpoints live in the workspace's
git-ignored state folder, never in ``data/``::

    .cogalign/checkpoints/<stage>/<key>/key.json              what the key was made of
    .cogalign/checkpoints/<stage>/<key>/checkpoint-<step>/    Trainer's own layout: weights, optimizer,
                                                              scheduler, RNG state of every process,
                                                              trainer_state.json (step, log history)

``<key>`` digests everything that decides the training run: the stage's input files (content
hashes), its params and resolved recipe, the code fingerprint, the library versions and the
number of training processes. A checkpoint is therefore only ever resumed by a run that would
have produced it; one written for other inputs or params sits under another key and is ignored.

A checkpoint is *complete* when its ``trainer_state.json`` (the last file Trainer writes) parses
and names the folder's step; a folder cut short by a kill is deleted on the next start.
Trainer restores the weights, optimizer, scheduler, RNG states and the data position (it skips
the batches already seen), so a resumed run continues the same sequence of steps. Trainer keeps
at most ``save_total_limit`` checkpoints while it trains; once the stage has written its outputs,
:meth:`Checkpoints.finish` removes the stage's checkpoints, every key's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogalign_core import contract
from cogalign_core.io import atomic_write_json
from cogalign_core.provenance import package_versions, path_digest
from cogalign_core.train.launch import is_main_process, world_size
from cogalign_core.train.recipe import TrainSpec
from cogalign_core.train.trainlog import StepLog

CHECKPOINTS_DIR = Path(contract.CHECKPOINTS)  # inside the workspace's git-ignored state folder
KEY_FILE = "key.json"
STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
CHECKPOINT_PREFIX = "checkpoint-"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
KEY_LENGTH = 20


def run_key(workspace: Path, stage: str, inputs: Iterable[str], params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, ingredients) of one training run: a digest of what decides the trained weights.

    Args:
        inputs: workspace-relative files or folders the stage trains from (hashed by content; a
            missing one counts as missing).
        params: the stage's params and resolved recipe, JSON-serialisable.
    """
    from cogalign_core.stage import code_fingerprint

    ws = Path(workspace)
    code = ws / contract.fingerprint(stage)  # the fingerprint DVC saw; computed when run outside a workspace
    ingredients = {
        "stage": stage,
        "inputs": {rel: path_digest(ws / rel) if (ws / rel).exists() else None for rel in sorted(set(inputs))},
        "params": params,
        "code": json.loads(code.read_text()) if code.is_file() else code_fingerprint(stage),
        "packages": package_versions(),
        "processes": world_size(),
    }
    digest = hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:KEY_LENGTH], ingredients


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder, or None (not a checkpoint, or cut short)."""
    if not folder.is_dir() or not folder.name.startswith(CHECKPOINT_PREFIX):
        return None
    try:
        step = int(folder.name.removeprefix(CHECKPOINT_PREFIX))
        state = json.loads((folder / STATE_FILE).read_text())
    except (ValueError, OSError):
        return None
    return step if isinstance(state, dict) and state.get("global_step") == step else None


def latest_complete(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``directory``, or None."""
    found = [(step, p) for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if (step := checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # the stage log (and the run's progress reader) see it


@dataclass(frozen=True)
class Checkpoints:
    """Where one training stage saves checkpoints, and how often (see the module docstring)."""

    stage: str
    directory: Path
    key: str
    save_steps: int
    save_total_limit: int

    def trainer_args(self) -> dict[str, Any]:
        """Keyword arguments for ``TrainingArguments`` (``output_dir`` is :attr:`directory`)."""
        return {"save_strategy": "steps", "save_steps": self.save_steps, "save_total_limit": self.save_total_limit}

    def resume_from(self) -> Path | None:
        """The newest complete checkpoint of this run's key, or None."""
        return latest_complete(self.directory)

    def finish(self) -> None:
        """Remove every checkpoint of the stage (all keys): its outputs are written. Main process only."""
        if is_main_process():
            shutil.rmtree(self.directory.parent, ignore_errors=True)


def open_checkpoints(workspace: Path, stage: str, inputs: Iterable[str], params: dict[str, Any],
                     train: TrainSpec) -> Checkpoints:
    """The stage's checkpoint folder for these inputs; folders a kill cut short are removed."""
    key, ingredients = run_key(workspace, stage, inputs, params)
    directory = Path(workspace) / CHECKPOINTS_DIR / stage / key
    if is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / KEY_FILE, ingredients)
        for folder in directory.glob(f"{CHECKPOINT_PREFIX}*"):
            if checkpoint_step(folder) is None:
                shutil.rmtree(folder, ignore_errors=True)
    return Checkpoints(stage, directory, key, train.save_steps, train.save_total_limit)


def resume_point(checkpoints: Checkpoints | None, log: StepLog) -> str | None:
    """``resume_from_checkpoint`` for ``Trainer.train`` (None: start at step 0).

    Logs "resumed from step N" and puts the checkpoint's logged history back into ``log``, so the
    stage's log.csv covers every step, not only those after the resume.
    """
    found = checkpoints.resume_from() if checkpoints is not None else None
    if found is None:
        return None
    state = json.loads((found / STATE_FILE).read_text())
    for entry in state.get("log_history", []):
        row = log.rows.setdefault(int(entry.get("step", 0)), {})
        row.update({k: float(v) for k, v in entry.items()
                    if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)})
    assert checkpoints is not None
    _log(f"{checkpoints.stage}: resumed from step {state['global_step']} of {state.get('max_steps')} "
         f"(checkpoint {checkpoints.key}/{found.name})")
    return str(found)


@contextlib.contextmanager
def training_dir(checkpoints: Checkpoints | None, prefix: str) -> Iterator[Path]:
    """Trainer's ``output_dir``: the checkpoint folder, or a temporary folder when not checkpointing."""
    if checkpoints is not None:
        yield checkpoints.directory
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
