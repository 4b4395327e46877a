"""Orchestration overhead: ``cogalign run --until counterfactual`` vs the same stage functions called directly.

Both sides start from a freshly initialised workspace holding the same raw data (default: the full
``../shared/data`` next to this checkout, registered as one batch; ``--data`` picks another folder,
e.g. ``data/sample``). The direct side calls every stage function up to ``counterfactual`` in this
process, in DVC's order; the orchestrated side is the real command line in a fresh process, so it
pays for everything a user waits for: the Prefect server start, the flow, the DVC stage processes
(hashing, ``dvc.lock``) and the git commit. A second ``cogalign run`` on the now up-to-date
workspace is the no-op rerun. Prints the times and the ratios with their goals:

- orchestrated / direct <= 1.25
- no-op rerun / orchestrated full run <= 0.05

    python benchmarks/bench_spine.py [--data DIR] [--until STAGE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
SALT = "bench-" + "0" * 58


def _workspace(root: Path, data: Path) -> Path:
    from cogalign.workspace import init_workspace, register

    ws = init_workspace(root, salt=SALT)
    register(ws, data)
    return ws.root


def direct_run(root: Path, until: str) -> float:
    """Seconds to call every stage function up to ``until`` in this process, in DVC's order."""
    from cogalign.dag import pipeline_stages, upstream_closure
    from cogalign_core import stage

    order = [s.name for s in upstream_closure(pipeline_stages(root), until)]  # before the clock starts
    start = time.perf_counter()
    with contextlib.chdir(root):
        for name in order:
            base, _, item = name.partition("@")
            stage.run(base, item or None, root)
    return time.perf_counter() - start


def cli_run(root: Path, until: str) -> tuple[float, str]:
    """Seconds of ``cogalign run --until`` as a user runs it (fresh process, no Prefect server configured)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    start = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "cogalign"), "run", "--workspace", str(root),
                          "--until", until], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"cogalign run failed:\n{out.stdout}\n{out.stderr}")
    return seconds, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="raw data folder")
    parser.add_argument("--until", default="counterfactual", help="last stage of both sides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spine-") as tmp:
        direct_ws = _workspace(Path(tmp) / "direct", args.data)
        run_ws = _workspace(Path(tmp) / "run", args.data)
        direct = direct_run(direct_ws, args.until)
        orchestrated, table = cli_run(run_ws, args.until)
        noop, noop_out = cli_run(run_ws, args.until)
    print("\n".join(line for line in table.splitlines() if line[:1] in "┏┃┡│└"))  # the summary table
    print(f"data: {args.data}")
    print(f"direct stage functions up to {args.until}:       {direct:8.2f} s")
    print(f"`cogalign run --until {args.until}` (CLI):  {orchestrated:8.2f} s  "
          f"(fixed overhead {orchestrated - direct:.1f} s)")
    print(f"`cogalign run` again (no-op rerun):            {noop:8.2f} s  "
          f"({'up to date' if 'up to date' in noop_out else 'NOT up to date'})")
    print(f"ratio orchestrated/direct = {orchestrated / direct:.3f}  (goal <= 1.25)")
    print(f"ratio no-op/full run      = {noop / orchestrated:.3f}  (goal <= 0.05)")


if __name__ == "__main__":
    main()
