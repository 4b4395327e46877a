"""Stage registry and the command DVC runs: ``python -m cogalign_core.stage NAME [--item ID]``.

The registry names, for each DVC stage, the function that does the work and the modules whose
source makes up its code fingerprint. Entry points are imported lazily, so running a data stage
never imports torch, and computing fingerprints imports nothing at all.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cogalign_core import __version__

SHARED_MODULES: tuple[str, ...] = (
    "cogalign_core.io", "cogalign_core.tables", "cogalign_core.taxonomy", "cogalign_core.answer_format",
    "cogalign_core.privacy", "cogalign_core.stage", "cogalign_core.provenance",
    # The params package's __init__ only: each stage lists its own params module, so changing one
    # stage's parameter model does not rerun every stage.
    "cogalign_core.config:__init__",
)


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its entry point ``module:function`` and the modules it depends on.

    The entry function is called as ``fn(workspace: Path, params: PipelineParams, item: str | None)``
    with the current directory set to the workspace.
    """

    entry: str
    modules: tuple[str, ...] = field(default_factory=tuple)


_TRAIN = ("cogalign_core.train", "cogalign_core.recipes", "cogalign_core.canvas", "cogalign_core.rewards",
          "cogalign_core.config.model")

STAGES: dict[str, StageSpec] = {
    "ingest_batch": StageSpec("cogalign_core.ingest:run_batch_stage",
                              ("cogalign_core.ingest", "cogalign_core.imaging", "cogalign_core.executor",
                               "cogalign_core.raw_batch", "cogalign_core.config.ingest")),
    "ingest": StageSpec("cogalign_core.ingest:run_merge_stage",
                        ("cogalign_core.ingest", "cogalign_core.imaging", "cogalign_core.raw_batch",
                         "cogalign_core.config.ingest")),
    "annotate": StageSpec("cogalign_core.annotate:run_stage",
                          ("cogalign_core.annotate", "cogalign_core.config.annotate")),
    "masks": StageSpec("cogalign_core.masks:run_stage",
                       ("cogalign_core.masks", "cogalign_core.segmenters", "cogalign_core.review",
                        "cogalign_core.executor", "cogalign_core.config.masks")),
    "counterfactual": StageSpec("cogalign_core.counterfactual:run_stage",
                                ("cogalign_core.counterfactual", "cogalign_core.inpaint", "cogalign_core.fov",
                                 "cogalign_core.executor", "cogalign_core.config.counterfactual")),
    "base_model": StageSpec("cogalign_core.train.base_model:run_stage", _TRAIN),
    "sft": StageSpec("cogalign_core.train.sft:run_stage", _TRAIN),
    "sft_cf": StageSpec("cogalign_core.train.sft:run_cf_stage", _TRAIN),
    "rl_no_cf": StageSpec("cogalign_core.train.grpo:run_no_cf_stage", _TRAIN),
    "rl": StageSpec("cogalign_core.train.grpo:run_stage", _TRAIN),
    "evaluate": StageSpec("cogalign_core.evaluate:run_stage",
                          ("cogalign_core.evaluate", "cogalign_core.metrics", "cogalign_core.report",
                           "cogalign_core.config.evaluate", *_TRAIN)),
}


def _module_files(name: str) -> list[tuple[str, Path]]:
    """(key, path) of a module's source file, or of every file in a package, without importing it.

    Keys are ``module`` for a module and ``package/relative/path`` for package files, so the
    fingerprint does not depend on where the package is installed.
    """
    package_init_only = name.endswith(":__init__")
    name = name.removesuffix(":__init__")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return []
    if spec.submodule_search_locations and not package_init_only:
        # A package: every source and data file (recipes are YAML), never bytecode caches.
        return sorted((f"{name}/{p.relative_to(loc).as_posix()}", p)
                      for loc in spec.submodule_search_locations for p in Path(loc).rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    return [(name, Path(spec.origin))]


def code_fingerprint(stage: str) -> dict[str, object]:
    """Deterministic fingerprint of the code a stage runs: package version + module source hashes."""
    spec = STAGES[stage]
    files: dict[str, str] = {}
    for name in sorted(set(SHARED_MODULES + spec.modules)):
        for key, path in _module_files(name):
            files[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"stage": stage, "package_version": __version__, "sources": dict(sorted(files.items()))}


def fingerprint_text(stage: str) -> str:
    """The fingerprint as the exact text written to ``code/<stage>.json`` in a workspace."""
    return json.dumps(code_fingerprint(stage), indent=2, sort_keys=True) + "\n"


def run(stage: str, item: str | None = None, workspace: Path | None = None) -> None:
    """Load params and call the stage's entry function."""
    from cogalign_core.config import load_params

    ws = (workspace or Path.cwd()).resolve()
    params = load_params(ws)
    module_name, func_name = STAGES[stage].entry.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(ws, params, item)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogalign_core.stage", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--item", default=None, help="foreach item (batch id) for per-batch stages")
    parser.add_argument("--fingerprint", action="store_true", help="print the stage's code fingerprint and exit")
    args = parser.parse_args(argv)
    if args.fingerprint:
        sys.stdout.write(fingerprint_text(args.stage))
        return 0
    run(args.stage, args.item)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
