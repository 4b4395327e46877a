"""The end-to-end flow: every DVC stage as a Prefect task, started as soon as DVC's graph allows.

Stages whose inputs are ready run side by side (``cogalign.scheduler``): GPU stages wait for devices
from the allocator, CPU stages share the cores; a failed stage stops only what depends on it.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from cogalign.dag import StageNode, downstream_closure, pipeline_stages, upstream_closure
from cogalign.runner import previous_stage_seconds
from cogalign.scheduler import cpu_stage_slots, critical_path_priority, run_dag
from cogalign.stage_worker import worker_pool
from cogalign.tasks.dvc_stage import allocator, dvc_stage
from cogalign.workspace import STATE_DIR, Workspace
from cogalign_core import contract


def select_stages(stages: list[StageNode], until: str | None = None, from_stage: str | None = None) -> list[str]:
    """Stage names to run: all, or the closure up to ``until`` / down from ``from_stage``."""
    selected = upstream_closure(stages, until) if until else stages
    if from_stage:
        keep = {s.name for s in downstream_closure(stages, from_stage)}
        selected = [s for s in selected if s.name in keep]
    return [s.name for s in selected]


def _first_done(futures: list[PrefectFuture[dict[str, Any]]]) -> list[PrefectFuture[dict[str, Any]]]:
    return [next(iter(as_completed(futures)))]


@flow(name="cogalign-end-to-end", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=32))
def end_to_end(workspace: str, until: str | None = None, from_stage: str | None = None, force: bool = False,
               recipe: str | None = None) -> dict[str, object]:
    """Run the pipeline on ``workspace``; DVC skips every stage whose inputs did not change.

    Args:
        workspace: workspace directory.
        until: stop after this stage (and what it needs).
        from_stage: restart from this stage (it and everything downstream are forced).
        force: rerun the selected stages even if DVC considers them up to date.
        recipe: switch ``params.model.recipe`` first (recorded like any params change).

    Raises:
        StageFailed: the first stage (in DVC's order) that failed, after the stages that did not
            depend on it finished; its ``stages`` attribute lists what every stage did.
    """
    logger = get_run_logger()
    ws = Workspace.open(workspace)
    if recipe is not None and ws.params.model.recipe != recipe:
        params = ws.params
        params.model.recipe = recipe
        ws.write_params(params)
    run_id = str(flow_run.get_id() or "local")
    log_dir = str(ws.root / STATE_DIR / "logs" / run_id)
    stages = pipeline_stages(ws.root)  # DVC's index and graph: opened once per run
    nodes = {n.name: n for n in stages}
    plan = [nodes[name] for name in select_stages(stages, until=until, from_stage=from_stage)]
    forced = {n.name for n in plan} if (force or from_stage) else set()
    gpus_present = bool(allocator().devices)

    def submit(node: StageNode, after: list[PrefectFuture[dict[str, Any]]]) -> PrefectFuture[dict[str, Any]]:
        return dvc_stage.submit(str(ws.root), node.name, node.gpus, log_dir, force=node.name in forced,
                                wait_for=after)  # wait_for: the dependency edges in Prefect's UI

    def finished(node: StageNode, result: dict[str, Any]) -> None:
        logger.info("%s: %s in %.1fs on %s", node.name, result["status"], result["seconds"], result["devices"])
        _publish_stage_artifact(ws, node.name, node.outs, result)
        if node.name == "evaluate":
            _publish_evaluation(ws)

    with worker_pool(ws.root) as pool:
        pool.keep_spare = True  # a warm DVC worker is ready whenever a stage starts next to a running one
        run = run_dag(plan, submit, _first_done, lambda f: f.result(), cpu_slots=cpu_stage_slots(workspace),
                      uses_gpu=lambda n: gpus_present and n.gpus > 0,
                      priority=critical_path_priority(plan, previous_stage_seconds(ws)), on_result=finished,
                      on_skip=lambda n, cause: logger.warning("%s: skipped, %s failed", n.name, cause))
    results = run.stage_results(plan)
    if run.failures:
        first = run.first_failure(plan)
        first.stages = results  # type: ignore[attr-defined]
        raise first
    return {"flow_run_id": run_id, "stages": results}


def _artifact_key(name: str) -> str:
    return "stage-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def _publish_stage_artifact(ws: Workspace, name: str, outs: tuple[str, ...], result: dict[str, object]) -> None:
    """Markdown artifact: what ran, on which device, output hashes (dvc.lock) and the stage's counts."""
    try:
        lock = ws.lock_stages().get(name, {})
    except Exception:  # a concurrent stage's DVC may be rewriting dvc.lock right now: no hashes this time
        lock = {}
    lines = [f"### {name}", "", f"- status: {result['status']}",
             f"- seconds: {result['seconds']} (waited {result['waited']} for GPUs)", f"- devices: {result['devices']}",
             "", "| output | md5 |",
             "| --- | --- |"]
    for out in lock.get("outs", []):
        lines.append(f"| `{out.get('path')}` | `{out.get('md5', '')}` |")
    for out in outs:
        summary = ws.root / out / "summary.json" if (ws.root / out).is_dir() else None
        if summary is None and out.endswith("summary.json"):
            summary = ws.root / out
        if summary is not None and summary.exists():
            lines += ["", "```json", summary.read_text().strip()[:4000], "```"]
    create_markdown_artifact(key=_artifact_key(name), markdown="\n".join(lines), description=f"stage {name}")


def _publish_evaluation(ws: Workspace) -> None:
    """Metrics table artifact and a link to the HTML report."""
    metrics_path = ws.root / contract.METRICS
    if not metrics_path.exists():
        return
    from cogalign.compare import flatten_figures

    figures = flatten_figures(json.loads(metrics_path.read_text()))
    rows = [{"metric": key, "value": v.get("value"), "ci_low": v.get("ci_low"), "ci_high": v.get("ci_high"),
             "n": v.get("n"), "constant_baseline": v.get("constant_baseline"),
             "majority_baseline": v.get("majority_baseline")}
            for key, v in sorted(figures.items()) if ".by_source." not in key]
    if rows:
        create_table_artifact(key="evaluation-metrics", table=rows, description="evaluation metrics (95% CI)")
    report = ws.root / contract.REPORT
    create_markdown_artifact(key="evaluation-report",
                             markdown=f"Evaluation report: [{report}](file://{report})", description="report link")
