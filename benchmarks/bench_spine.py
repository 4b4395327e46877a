"""Orchestration overhead: `cogalign run --until annotate` vs the same stage functions called directly.

Both sides start from a freshly initialised workspace holding the bundled sample. The direct side
calls ingest_batch, ingest and annotate in-process; the orchestrated side pays for the ephemeral
Prefect server, the DVC child processes (hashing, dvc.lock) and the git commit. Prints both times
and the ratio direct/orchestrated (1.0 = no overhead).

    python benchmarks/bench_spine.py
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from cogalign.runner import run_pipeline
    from cogalign.workspace import init_workspace
    from cogalign_core import annotate, ingest, ingest_merge
    from cogalign_core.config import load_params

    with tempfile.TemporaryDirectory() as tmp:
        direct_ws = init_workspace(Path(tmp) / "direct", sample=True, salt="bench" * 8)
        params = load_params(direct_ws.root)
        start = time.perf_counter()
        with contextlib.chdir(direct_ws.root):
            for batch in params.batches:
                ingest.run_batch_stage(direct_ws.root, params, batch)
            ingest_merge.run_stage(direct_ws.root, params, None)
            annotate.run_stage(direct_ws.root, params, None)
        direct = time.perf_counter() - start

        run_ws = init_workspace(Path(tmp) / "run", sample=True, salt="bench" * 8)
        start = time.perf_counter()
        run_pipeline(run_ws.root, until="annotate")
        orchestrated = time.perf_counter() - start
        start = time.perf_counter()
        outcome = run_pipeline(run_ws.root, until="annotate")
        noop_check = time.perf_counter() - start
    print(f"direct stage functions (ingest_batch, ingest, annotate): {direct:7.2f} s")
    print(f"cogalign run --until annotate (Prefect + DVC + commit):  {orchestrated:7.2f} s")
    print(f"ratio direct/orchestrated = {direct / orchestrated:.2f}  "
          f"(fixed overhead {orchestrated - direct:.1f} s: ephemeral Prefect server, DVC processes, git)")
    print(f"`cogalign run` on an up-to-date workspace: {noop_check:.2f} s (up_to_date={outcome.up_to_date}; "
          f"no Prefect server is started)")


if __name__ == "__main__":
    main()
