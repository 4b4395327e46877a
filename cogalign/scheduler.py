"""Concurrent scheduling of DVC stages along DVC's graph (no Prefect import: the flow passes its submit).

A stage starts as soon as every stage it depends on has finished. Stages that run on the CPU are
bounded by a number of slots (default: the usable cores); stages pinned to GPUs are not, they
wait for devices from the allocator instead. When a stage fails, every stage downstream of it is
skipped and the independent branches run to the end. Among ready CPU stages the one with the
longest remaining chain (by the previous run's stage times when known) starts first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cogalign.dag import StageNode
from cogalign_core.settings import env_name, load_settings

H = TypeVar("H")  # a handle of a submitted stage (a Prefect future in the flow)

CPU_SLOTS_ENV = env_name("cpu_stage_slots")


def cpu_stage_slots(workspace: str | os.PathLike[str] | None = None) -> int:
    """How many CPU stages may run at once: the ``cpu_stage_slots`` execution setting, else the usable cores.

    Raises:
        ValueError: the setting is invalid (the message names ``COGALIGN_CPU_STAGE_SLOTS``).
    """
    slots = load_settings(workspace).cpu_stage_slots
    if slots:
        return slots
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class DagRun(Generic[H]):
    """What happened to each stage: results of finished stages, the failures and the skipped ones."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, Exception] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> the failed stage it depends on

    def stage_results(self, nodes: Sequence[StageNode]) -> list[dict[str, Any]]:
        """One entry per stage in ``nodes``' order: its result, or ``status`` failed / skipped and why."""
        out: list[dict[str, Any]] = []
        for node in nodes:
            if node.name in self.results:
                out.append(self.results[node.name])
            elif node.name in self.failures:
                out.append({"stage": node.name, "status": "failed", "ran": False,
                            "error": str(self.failures[node.name])})
            elif node.name in self.skipped:
                out.append({"stage": node.name, "status": "skipped", "ran": False,
                            "error": f"{self.skipped[node.name]} failed"})
        return out

    def first_failure(self, nodes: Sequence[StageNode]) -> Exception:
        """The failure of the earliest failed stage in ``nodes``' (topological) order."""
        return next(exc for n in nodes if (exc := self.failures.get(n.name)) is not None)


def critical_path_priority(nodes: Sequence[StageNode], seconds: dict[str, float]) -> dict[str, float]:
    """For each stage, the expected seconds from its start to the end of its longest downstream chain."""
    downstream: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for up in n.upstream:
            if up in downstream:
                downstream[up].append(n.name)
    priority: dict[str, float] = {}
    for n in reversed(nodes):  # reverse topological order: children are done first
        own = max(seconds.get(n.name, 1.0), 0.01)
        priority[n.name] = own + max((priority[c] for c in downstream[n.name]), default=0.0)
    return priority


def run_dag(nodes: Sequence[StageNode], submit: Callable[[StageNode, list[H]], H],
            wait_any: Callable[[list[H]], Iterable[H]], result: Callable[[H], dict[str, Any]],
            uses_gpu: Callable[[StageNode], bool], cpu_slots: int,
            priority: dict[str, float] | None = None,
            on_result: Callable[[StageNode, dict[str, Any]], None] | None = None,
            on_skip: Callable[[StageNode, str], None] | None = None) -> DagRun[H]:
    """Run ``nodes`` (topologically ordered; edges in ``StageNode.upstream``) as their inputs become ready.

    Args:
        nodes: the stages to run; upstream stages outside ``nodes`` count as done.
        submit: start a stage, given the handles of its upstream stages; returns its handle.
        wait_any: block until at least one of the handles is finished; return the finished ones.
        result: a finished stage's result (raises the stage's exception when it failed).
        uses_gpu: True for a stage that waits for GPU slots instead of a CPU slot.
        cpu_slots: CPU stages running at once.
        priority: larger starts first among ready CPU stages (default: the longest chain of stages).
        on_result: called with each finished stage's result as it arrives.
        on_skip: called for a stage skipped because ``failed`` (a stage it depends on) failed.
    """
    names = {n.name for n in nodes}
    order = {n.name: i for i, n in enumerate(nodes)}
    priority = priority or critical_path_priority(nodes, {})
    run: DagRun[H] = DagRun()
    handles: dict[str, H] = {}
    running: dict[int, tuple[StageNode, H]] = {}  # id(handle) -> stage (handles need not be hashable)
    waiting = list(nodes)
    cpu_busy = 0

    def blocked_by(node: StageNode) -> str | None:
        for up in node.upstream:
            if up in run.failures:
                return up
            if up in run.skipped:
                return run.skipped[up]
        return None

    finished: list[StageNode] = []  # results not yet handed to ``on_result``
    while waiting or running:
        for node in list(waiting):
            cause = blocked_by(node)
            if cause is not None:
                waiting.remove(node)
                run.skipped[node.name] = cause
                if on_skip is not None:
                    on_skip(node, cause)
        ready = [n for n in waiting if all(u in run.results or u not in names for u in n.upstream)]
        ready.sort(key=lambda n: (-priority.get(n.name, 0.0), order[n.name]))
        for node in ready:
            gpu = uses_gpu(node)
            if not gpu and cpu_busy >= cpu_slots:
                continue
            cpu_busy += 0 if gpu else 1
            waiting.remove(node)
            handle = submit(node, [handles[u] for u in node.upstream if u in handles])
            handles[node.name] = handle
            running[id(handle)] = (node, handle)
        for node in finished:  # after the next stages started: publishing never delays them
            if on_result is not None:
                on_result(node, run.results[node.name])
        finished = []
        if not running:
            if waiting:  # cannot happen with a valid DAG; never spin
                raise RuntimeError(f"stages can never start: {', '.join(n.name for n in waiting)}")
            break
        for handle in wait_any([h for _, h in running.values()]):
            node, _ = running.pop(id(handle))
            cpu_busy -= 0 if uses_gpu(node) else 1
            try:
                run.results[node.name] = result(handle)
            except Exception as exc:  # the stage's own failure; dependants are skipped
                run.failures[node.name] = exc
                continue
            finished.append(node)
    return run
