"""Concurrent DAG: wall time of the end-to-end flow vs the critical path of ``dvc.yaml``.

A workspace is initialised with the bundled sample (one raw batch), then every stage command in its
``dvc.yaml`` is replaced by one that sleeps a fixed time and creates the stage's outputs (and the
files other stages read inside them); deps, outs, params and ``meta.gpus`` stay as the pipeline
declares them. The flow runs on a simulated 4-GPU machine (``COGALIGN_GPU_DEVICES=0,1,2,3``) against
a Prefect server started beforehand (once per session: its start-up is not a per-run cost). Prints:

- the critical path (longest chain of sleeps along DVC's edges) and the sequential sum;
- the flow's wall time and the ratio flow / critical path (goal <= 1.1; 1.0 = no overhead, the
  sequential flow of before was sequential sum / critical path);
- the whole ``run_pipeline`` (lock, fingerprints, ``dvc status``, flow, git commit) for reference.

    python benchmarks/bench_dag.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ["COGALIGN_GPU_DEVICES"] = "0,1,2,3"

# Seconds each stage sleeps: roughly the demo's proportions (training dominates, four arms).
SECONDS = {"ingest_batch": 4, "ingest": 2, "annotate": 2, "masks": 6, "counterfactual": 6, "base_model": 3,
           "sft": 12, "sft_cf": 12, "rl_no_cf": 12, "rl": 12, "evaluate": 8}


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def sleeping_pipeline(dvc_yaml: dict, scale: float) -> dict:
    """``dvc_yaml`` with each command replaced by ``sleep`` + creating its outputs (files others read too)."""
    bodies = {name: (spec["do"] if "foreach" in spec else spec) for name, spec in dvc_yaml["stages"].items()}
    all_deps = [str(next(iter(d)) if isinstance(d, dict) else d) for body in bodies.values()
                for d in body.get("deps", [])]
    for name, body in bodies.items():
        if name not in SECONDS:
            raise SystemExit(f"no sleep time for stage {name!r}: add it to SECONDS")
        dirs, files = [], []
        for entry in body.get("outs", []):
            out = str(next(iter(entry)) if isinstance(entry, dict) else entry)  # `- path: {persist: true}`
            if Path(out).suffix:  # a file output
                files.append(out)
            else:  # a directory output: a marker plus every file another stage reads inside it
                dirs.append(out)
                files += [f"{out}/done", *sorted({d for d in all_deps if _inside(d, out)})]
        dirs += sorted({str(Path(f).parent) for f in files})
        body["cmd"] = (f"sleep {SECONDS[name] * scale:g} && mkdir -p {' '.join(map(shlex.quote, sorted(set(dirs))))}"
                       f" && touch {' '.join(map(shlex.quote, files))}")
    return dvc_yaml


def critical_path(root: Path, scale: float) -> tuple[float, float, list[str]]:
    """(longest chain of sleeps, sum of all sleeps, the chain) over DVC's graph of ``root``."""
    from cogalign.dag import pipeline_stages

    nodes = pipeline_stages(root)
    seconds = {n.name: SECONDS[n.name.split("@")[0]] * scale for n in nodes}
    best: dict[str, tuple[float, list[str]]] = {}
    for node in nodes:  # topological order
        before = max((best[u] for u in node.upstream), default=(0.0, []), key=lambda b: b[0])
        best[node.name] = (before[0] + seconds[node.name], [*before[1], node.name])
    length, chain = max(best.values(), key=lambda b: b[0])
    return length, sum(seconds.values()), chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's sleep")
    args = parser.parse_args()
    from cogalign.dag import pipeline_stages
    from cogalign.runner import prefect_api, run_pipeline
    from cogalign.scheduler import cpu_stage_slots
    from cogalign.workspace import Workspace, init_workspace

    with tempfile.TemporaryDirectory(prefix="bench-dag-") as tmp:
        roots = []
        for name in ("flow", "run"):
            ws = init_workspace(Path(tmp) / name, sample=True, salt="bench-" + "0" * 58)
            path = ws.root / "dvc.yaml"
            path.write_text(yaml.safe_dump(sleeping_pipeline(yaml.safe_load(path.read_text()), args.scale),
                                           sort_keys=False))
            ws.commit("bench: sleeping stage commands")
            roots.append(ws.root)
        length, total, chain = critical_path(roots[0], args.scale)
        with prefect_api(Workspace.open(roots[0])):
            from cogalign.flows.pipeline import end_to_end

            nodes = pipeline_stages(roots[0])
            start, flow_start = time.perf_counter(), time.time()
            out = end_to_end(str(roots[0]))
            flow = time.perf_counter() - start
            start = time.perf_counter()
            run_pipeline(roots[1])
            whole = time.perf_counter() - start
    print(f"simulated GPUs: {os.environ['COGALIGN_GPU_DEVICES']}; CPU stage slots: {cpu_stage_slots()}")
    finish = {s["stage"]: s["finished_unix"] for s in out["stages"]}
    upstream = {n.name: n.upstream for n in nodes}
    print("  stage                status      slept   DVC+task  device  gap after its inputs")
    for s in out["stages"]:
        ready = max((finish[u] for u in upstream[s["stage"]]), default=flow_start)
        slept = SECONDS[s["stage"].split("@")[0]] * args.scale
        print(f"  {s['stage']:<20} {s['status']:<10} {slept:6.1f} s  {s['seconds'] - slept:6.2f} s  "
              f"{s['devices']:<6}  {s['started_unix'] - ready:5.2f} s (waited {s['waited']:.2f} s for GPUs)")
    print(f"critical path ({' -> '.join(chain)}): {length:6.1f} s; all stages one after another: {total:6.1f} s")
    print(f"end-to-end flow wall time:        {flow:6.1f} s")
    print(f"ratio flow / critical path = {flow / length:.3f}  (goal <= 1.1; one stage at a time would be "
          f"{total / length:.2f})")
    print(f"run_pipeline (lock, status, flow, commit): {whole:6.1f} s  ratio {whole / length:.3f}")


if __name__ == "__main__":
    main()
