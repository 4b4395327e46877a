"""The pipeline DAG as DVC sees it: stage order and per-stage metadata, read from ``dvc.yaml``.

There is no second copy of the DAG: the Prefect flow asks DVC for its graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageNode:
    """One runnable DVC stage (a ``foreach`` item is its own node, e.g. ``ingest_batch@b0001``)."""

    name: str
    gpus: int
    deps: tuple[str, ...]
    outs: tuple[str, ...]


def pipeline_stages(workspace: Path) -> list[StageNode]:
    """All stages in a deterministic topological order (dependencies first, then dvc.yaml order)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph
        # Pipeline stages only: `.dvc` files (raw batches) are data sources, not runnable stages.
        stages = [s for s in graph.nodes if isinstance(s, PipelineStage)]
        position = {s.name: i for i, s in enumerate(repo.index.stages) if isinstance(s, PipelineStage)}
        sub = graph.subgraph(stages)
        # DVC edges point from a stage to the stages it depends on; reverse for run order.
        ordered = list(nx.lexicographical_topological_sort(
            sub.reverse(copy=True), key=lambda s: (position.get(s.name, 1 << 30), s.name)))
        return [
            StageNode(
                name=s.name,
                gpus=int((s.meta or {}).get("gpus", 0)),
                deps=tuple(str(d.def_path) for d in s.deps),
                outs=tuple(str(o.def_path) for o in s.outs),
            )
            for s in ordered
        ]


def upstream_closure(stages: list[StageNode], target: str) -> list[StageNode]:
    """``target`` (a stage name, or a foreach group like ``ingest_batch``) and everything it needs."""
    names = {s.name for s in stages}
    wanted = {n for n in names if n == target or n.split("@", 1)[0] == target}
    if not wanted:
        raise KeyError(f"no stage {target!r}; stages: {', '.join(sorted(names))}")
    produced_by = {o: s.name for s in stages for o in s.outs}
    by_name = {s.name: s for s in stages}
    todo = list(wanted)
    while todo:
        node = by_name[todo.pop()]
        for dep in node.deps:
            for out, producer in produced_by.items():
                if (dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")) and producer not in wanted:
                    wanted.add(producer)
                    todo.append(producer)
    return [s for s in stages if s.name in wanted]


def downstream_closure(stages: list[StageNode], start: str) -> list[StageNode]:
    """``start`` and every stage that (transitively) depends on it."""
    names = {s.name for s in stages}
    wanted = {n for n in names if n == start or n.split("@", 1)[0] == start}
    if not wanted:
        raise KeyError(f"no stage {start!r}; stages: {', '.join(sorted(names))}")
    for s in stages:  # topological order: one pass suffices
        if s.name in wanted:
            continue
        for w in list(wanted):
            outs = next(x for x in stages if x.name == w).outs
            if any(d == o or d.startswith(o + "/") or o.startswith(d + "/") for d in s.deps for o in outs):
                wanted.add(s.name)
                break
    return [s for s in stages if s.name in wanted]
