"""Stage registry and the command DVC runs: ``python -m cogalign_core.stage NAME [--item ID]``.

The registry names, for each DVC stage, the function that does the work. Entry points are imported
lazily, so running a data stage never imports torch; fingerprints (:mod:`cogalign_core.fingerprint`)
read the sources without importing them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cogalign_core import __version__, fingerprint


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its entry point ``module:function``.

    The entry function is called as ``fn(workspace: Path, params: PipelineParams, item: str | None)``
    with the current directory set to the workspace. Its code fingerprint is the entry module's import
    closure (:mod:`cogalign_core.fingerprint`); paths and params are in :mod:`cogalign_core.contract`.
    """

    entry: str


STAGES: dict[str, StageSpec] = {
    "ingest_batch": StageSpec("cogalign_core.ingest:run_batch_stage"),
    "ingest": StageSpec("cogalign_core.ingest_merge:run_stage"),
    "annotate": StageSpec("cogalign_core.annotate:run_stage"),
    "masks": StageSpec("cogalign_core.masks:run_stage"),
    "counterfactual": StageSpec("cogalign_core.counterfactual:run_stage"),
    "base_model": StageSpec("cogalign_core.train.base_model:run_stage"),
    "sft": StageSpec("cogalign_core.train.sft:run_stage"),
    "sft_cf": StageSpec("cogalign_core.train.sft:run_cf_stage"),
    "rl_no_cf": StageSpec("cogalign_core.train.grpo:run_no_cf_stage"),
    "rl": StageSpec("cogalign_core.train.grpo:run_stage"),
    "evaluate": StageSpec("cogalign_core.evaluate:run_stage"),
}


def code_fingerprint(stage: str, recipe: str | None = None) -> dict[str, object]:
    """Deterministic fingerprint of the code a stage runs: package version, hashes of the modules it imports
    and of the selected recipe's files (:mod:`cogalign_core.fingerprint`)."""
    return {"stage": stage, "package_version": __version__,
            "sources": fingerprint.source_hashes(STAGES[stage].entry, recipe)}


def fingerprint_text(stage: str, recipe: str | None = None) -> str:
    """The fingerprint as the exact text written to ``code/<stage>.json`` in a workspace."""
    return json.dumps(code_fingerprint(stage, recipe), indent=2, sort_keys=True) + "\n"


def run(stage: str, item: str | None = None, workspace: Path | None = None) -> None:
    """Load params and call the stage's entry function with only the params the stage declares."""
    from cogalign_core.config import load_params
    from cogalign_core.config.declared import declared_view
    from cogalign_core.contract import STAGES as CONTRACT

    ws = (workspace or Path.cwd()).resolve()
    params = declared_view(load_params(ws), CONTRACT[stage].params, stage)
    module_name, func_name = STAGES[stage].entry.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(ws, params, item)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogalign_core.stage", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--item", default=None, help="foreach item (batch id) for per-batch stages")
    parser.add_argument("--fingerprint", action="store_true", help="print the stage's code fingerprint and exit")
    parser.add_argument("--recipe", default=None, help="with --fingerprint: the workspace's model.recipe")
    args = parser.parse_args(argv)
    if args.fingerprint:
        sys.stdout.write(fingerprint_text(args.stage, args.recipe))
        return 0
    run(args.stage, args.item)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
