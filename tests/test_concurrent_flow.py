"""The concurrent DAG: stages start when their inputs are ready, GPU stages overlap on a simulated
GPU list without sharing a device, CPU stages respect their slots, a failure stops only its dependants.

The flow tests run the real ``end_to_end`` flow (Prefect tasks, DVC workers, ``dvc repro``) on a
small DVC project whose stage commands record what they saw. Overlap is proven without clocks: each
of two GPU stages waits for the other to have started (a file barrier) and fails if it never does.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cogalign.dag import StageNode, pipeline_stages
from cogalign.processes import StageFailed
from cogalign.scheduler import CPU_SLOTS_ENV, cpu_stage_slots, critical_path_priority, run_dag
from cogalign.tasks.gpu import SIMULATED_ENV

# A stage command: record devices and the time window, optionally wait for a partner stage to start
# (so two stages can only both succeed if they run at the same time), optionally fail.
STAGE_SCRIPT = """
import json, os, sys, time
name, partner, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "fail"
os.makedirs("marks", exist_ok=True)
open(f"marks/{name}.started", "w").close()
start = time.time()
if partner != "-":
    deadline = time.time() + 120
    while not os.path.exists(f"marks/{partner}.started"):
        if time.time() > deadline:
            sys.exit(f"{name}: {partner} never started while {name} ran")
        time.sleep(0.05)
if fail:
    sys.exit(f"{name}: failing on purpose")
os.makedirs("out", exist_ok=True)
with open(f"out/{name}.json", "w") as fh:
    json.dump({"devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "start": start, "end": time.time()}, fh)
"""


def _stage(name: str, deps: list[str], gpus: int = 0, partner: str = "-", fail: bool = False) -> dict[str, object]:
    stage: dict[str, object] = {
        "cmd": f"{sys.executable} stage.py {name} {partner} {'fail' if fail else 'ok'}",
        "deps": ["stage.py", *deps], "outs": [f"out/{name}.json"]}
    if gpus:
        stage["meta"] = {"gpus": gpus}
    return stage


def _project(root: Path, stages: dict[str, dict[str, object]]) -> Path:
    """A git + DVC project (what ``Workspace.open`` needs) with ``stages`` as its dvc.yaml."""
    root.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return root


def _window(root: Path, name: str) -> dict[str, object]:
    return json.loads((root / "out" / f"{name}.json").read_text())


@pytest.fixture
def simulated_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import cogalign.tasks.dvc_stage as dvc_stage

    monkeypatch.setenv(SIMULATED_ENV, "0,1")
    monkeypatch.setattr(dvc_stage, "_ALLOCATOR", None)  # the process-wide allocator reads the new list


def test_dag_edges_come_from_dvc(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"prep": _stage("prep", []),
                                     "a": _stage("a", ["out/prep.json"], gpus=1),
                                     "b": _stage("b", ["out/prep.json"], gpus=2),
                                     "report": _stage("report", ["out/a.json", "out/b.json"])})
    nodes = {n.name: n for n in pipeline_stages(root)}
    assert [n for n in nodes] == ["prep", "a", "b", "report"]
    assert nodes["prep"].upstream == () and nodes["a"].upstream == ("prep",)
    assert nodes["report"].upstream == ("a", "b") and (nodes["a"].gpus, nodes["b"].gpus) == (1, 2)


@pytest.mark.timeout(300)
def test_two_gpu_stages_overlap_on_disjoint_devices(prefect_harness: None, simulated_gpus: None,
                                                   tmp_path: Path) -> None:
    from cogalign.flows.pipeline import end_to_end

    root = _project(tmp_path / "p", {
        "prep": _stage("prep", []),
        "train_a": _stage("train_a", ["out/prep.json"], gpus=1, partner="train_b"),
        "train_b": _stage("train_b", ["out/prep.json"], gpus=1, partner="train_a"),
        "train_c": _stage("train_c", ["out/prep.json"], gpus=1),  # a third GPU stage: waits for a free device
        "report": _stage("report", ["out/train_a.json", "out/train_b.json", "out/train_c.json"]),
    })
    out = end_to_end(str(root))
    status = {s["stage"]: s["status"] for s in out["stages"]}
    assert status == dict.fromkeys(("prep", "train_a", "train_b", "train_c", "report"), "ran")
    a, b = _window(root, "train_a"), _window(root, "train_b")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # they really ran at the same time
    gpu = {n: _window(root, n) for n in ("train_a", "train_b", "train_c")}
    assert all(len(str(w["devices"]).split(",")) == 1 and w["devices"] in ("0", "1") for w in gpu.values())
    for x in gpu:
        for y in gpu:
            if x < y and gpu[x]["start"] < gpu[y]["end"] and gpu[y]["start"] < gpu[x]["end"]:
                assert gpu[x]["devices"] != gpu[y]["devices"], (x, y, gpu)  # never one device for two stages
    assert all(_window(root, "prep")["end"] <= w["start"] for w in gpu.values())
    assert _window(root, "report")["start"] >= max(float(w["end"]) for w in gpu.values())  # type: ignore[arg-type]


@pytest.mark.timeout(300)
def test_a_failed_stage_stops_its_dependants_and_independent_branches_finish(
        prefect_harness: None, tmp_path: Path) -> None:
    from cogalign.flows.pipeline import end_to_end

    root = _project(tmp_path / "p", {
        "prep": _stage("prep", []),
        "broken": _stage("broken", ["out/prep.json"], fail=True),
        "after_broken": _stage("after_broken", ["out/broken.json"]),
        "report": _stage("report", ["out/after_broken.json", "out/prep.json"]),
        "side": _stage("side", ["out/prep.json"]),
        "after_side": _stage("after_side", ["out/side.json"]),
    })
    with pytest.raises(StageFailed, match="stage 'broken' failed") as info:
        end_to_end(str(root))
    status = {s["stage"]: s["status"] for s in info.value.stages}  # type: ignore[attr-defined]
    assert status == {"prep": "ran", "broken": "failed", "after_broken": "skipped", "report": "skipped",
                      "side": "ran", "after_side": "ran"}
    assert (root / "out/after_side.json").is_file() and not (root / "out/report.json").exists()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prep", "side", "after_side"}  # what finished is recorded; a rerun resumes there


# ---------------------------------------------------------------------------------------------- scheduler


def _chain(spec: dict[str, tuple[str, ...]], gpus: dict[str, int] | None = None) -> list[StageNode]:
    return [StageNode(name, (gpus or {}).get(name, 0), (), (), up) for name, up in spec.items()]


def _run(nodes: list[StageNode], work: dict[str, object], cpu_slots: int, gpu_machine: bool = False):
    """Run ``nodes`` with ``run_dag`` on a thread pool; ``work[name]`` is a callable or an exception."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    live, peak, order = [0], [0], []
    guard = threading.Lock()

    def body(name: str) -> dict[str, object]:
        with guard:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            order.append(name)
        try:
            job = work.get(name)
            if isinstance(job, Exception):
                raise job
            if callable(job):
                job()
            return {"stage": name}
        finally:
            with guard:
                live[0] -= 1

    def wait_any(futures: list[concurrent.futures.Future]) -> set[concurrent.futures.Future]:
        return concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED).done

    try:
        run = run_dag(nodes, lambda n, after: pool.submit(body, n.name), wait_any, lambda f: f.result(),
                      uses_gpu=lambda n: gpu_machine and n.gpus > 0, cpu_slots=cpu_slots)
    finally:
        pool.shutdown(wait=True)
    return run, peak[0], order


def test_cpu_stages_never_exceed_their_slots() -> None:
    nodes = _chain({"root": (), **{f"leaf{i}": ("root",) for i in range(6)}})
    run, peak, _ = _run(nodes, {f"leaf{i}": lambda: time.sleep(0.05) for i in range(6)}, cpu_slots=2)
    assert set(run.results) == {n.name for n in nodes} and peak == 2


def test_gpu_stages_are_not_bounded_by_cpu_slots() -> None:
    nodes = _chain({"a": (), "b": (), "c": ()}, gpus={"a": 1, "b": 1, "c": 1})
    barrier = threading.Barrier(3, timeout=30)  # all three must be running at once to pass
    run, peak, _ = _run(nodes, dict.fromkeys("abc", barrier.wait), cpu_slots=1, gpu_machine=True)
    assert set(run.results) == {"a", "b", "c"} and peak == 3


def test_failure_skips_descendants_only() -> None:
    nodes = _chain({"a": (), "bad": ("a",), "child": ("bad",), "grandchild": ("child",), "other": ("a",),
                    "join": ("other", "child")})
    run, _, _ = _run(nodes, {"bad": RuntimeError("boom")}, cpu_slots=2)
    assert set(run.results) == {"a", "other"}
    assert set(run.failures) == {"bad"} and str(run.failures["bad"]) == "boom"
    assert run.skipped == {"child": "bad", "grandchild": "bad", "join": "bad"}


def test_longest_chain_starts_first() -> None:
    nodes = _chain({"root": (), "short": ("root",), "long1": ("root",), "long2": ("long1",)})
    priority = critical_path_priority(nodes, {"root": 1, "short": 1, "long1": 5, "long2": 5})
    assert priority == {"root": 11, "short": 1, "long1": 10, "long2": 5}
    _, _, order = _run(nodes, {}, cpu_slots=1)
    assert order.index("long1") < order.index("short")


def test_cpu_stage_slots_default_to_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv(CPU_SLOTS_ENV, raising=False)
    assert cpu_stage_slots() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(CPU_SLOTS_ENV, "3")
    assert cpu_stage_slots() == 3
    monkeypatch.setenv(CPU_SLOTS_ENV, "zero")
    with pytest.raises(ValueError, match=CPU_SLOTS_ENV):
        cpu_stage_slots()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_concurrent_run_outputs_equal_a_one_stage_at_a_time_run(full_workspace: Path, spine_workspace: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole tiny pipeline, one stage at a time (as the flow ran before), gives the same bytes as
    the concurrent run of ``full_workspace`` (two CPU stages at a time on the test machine)."""
    from cogalign.runner import run_pipeline
    from tests.conftest import copy_workspace

    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    monkeypatch.setenv(CPU_SLOTS_ENV, "1")
    outcome = run_pipeline(ws)
    windows = [(s["started_unix"], s["finished_unix"]) for s in outcome.stages if s["ran"]]
    assert all(end <= start for (_, end), (start, _) in zip(sorted(windows), sorted(windows)[1:], strict=False))
    concurrent = yaml.safe_load((full_workspace / "dvc.lock").read_text())["stages"]
    sequential = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert sequential == concurrent
