"""The pipeline DAG as DVC sees it: stages, their edges and per-stage metadata, read from DVC's own graph.

There is no second copy of the DAG: the Prefect flow asks DVC for its graph (``Repo.index.graph``,
the graph ``dvc repro`` itself walks) and schedules along its edges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageNode:
    """One runnable DVC stage (a ``foreach`` item is its own node, e.g. ``ingest_batch@b0001``).

    ``upstream`` names the pipeline stages whose outputs this stage depends on (DVC's graph edges;
    raw ``.dvc`` data sources are not stages and not listed).
    """

    name: str
    gpus: int
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    upstream: tuple[str, ...] = ()


def pipeline_stages(workspace: Path) -> list[StageNode]:
    """All stages in a deterministic topological order (dependencies first, then dvc.yaml order).

    Remembered per workspace while ``dvc.yaml`` and ``params.yaml`` (``foreach`` items) are unchanged,
    so ``cogalign run`` reads the graph while the Prefect server starts and the flow finds it ready.
    """
    root = Path(workspace).resolve()
    return list(_pipeline_stages(root, tuple(_stat(root / name) for name in ("dvc.yaml", "params.yaml"))))


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _pipeline_stages(workspace: Path, signature: tuple[object, ...]) -> tuple[StageNode, ...]:
    del signature  # part of the cache key only
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
        rank = {s: i for i, s in enumerate(ordered)}
        return tuple(
            StageNode(
                name=s.name,
                gpus=int((s.meta or {}).get("gpus", 0)),
                deps=tuple(str(d.def_path) for d in s.deps),
                outs=tuple(str(o.def_path) for o in s.outs),
                upstream=tuple(u.name for u in sorted(sub.successors(s), key=rank.__getitem__)),
            )
            for s in ordered
        )


def paths_overlap(a: str, b: str) -> bool:
    """True when two workspace paths are equal or one contains the other (DVC's dep/out matching)."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _named(stages: list[StageNode], name: str) -> set[str]:
    """Stages called ``name``, or the items of the foreach group ``name``."""
    found = {s.name for s in stages if s.name == name or s.name.split("@", 1)[0] == name}
    if not found:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(sorted(s.name for s in stages))}")
    return found


def upstream_closure(stages: list[StageNode], target: str) -> list[StageNode]:
    """``target`` (a stage name, or a foreach group like ``ingest_batch``) and everything it needs."""
    wanted = _named(stages, target)
    for s in reversed(stages):  # reverse topological order: one pass suffices
        if s.name in wanted:
            wanted.update(s.upstream)
    return [s for s in stages if s.name in wanted]


def downstream_closure(stages: list[StageNode], start: str) -> list[StageNode]:
    """``start`` and every stage that (transitively) depends on it."""
    wanted = _named(stages, start)
    for s in stages:  # topological order: one pass suffices
        if s.name not in wanted and wanted.intersection(s.upstream):
            wanted.add(s.name)
    return [s for s in stages if s.name in wanted]
