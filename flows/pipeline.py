"""The end-to-end flow: every DVC stage as a Prefect task, in the order DVC's own graph gives."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from cogalign.dag import StageNode, downstream_closure, pipeline_stages, upstream_closure
from cogalign.tasks.dvc_stage import dvc_stage
from cogalign.workspace import Workspace
from cogalign_core import contract


def select_stages(stages: list[StageNode], until: str | None = None, from_stage: str | None = None) -> list[str]:
    """Stage names to run: all, or the closure up to ``until`` / down from ``from_stage``."""
    selected = upstream_closure(stages, until) if until else stages
    if from_stage:
        keep = {s.name for s in downstream_closure(stages, from_stage)}
        selected = [s for s in selected if s.name in keep]
    return [s.name for s in selected]


@flow(name="cogalign-end-to-end", log_prints=True)
def end_to_end(workspace: str, until: str | None = None, from_stage: str | None = None, force: bool = False,
               recipe: str | None = None) -> dict[str, object]:
    """Run the pipeline on ``workspace``; DVC skips every stage whose inputs did not change.

    Args:
        workspace: workspace directory.
        until: stop after this stage (and what it needs).
        from_stage: restart from this stage (it and everything downstream are forced).
        force: rerun the selected stages even if DVC considers them up to date.
        recipe: switch ``params.model.recipe`` first (recorded like any params change).
    """
    logger = get_run_logger()
    ws = Workspace.open(workspace)
    if recipe is not None and ws.params.model.recipe != recipe:
        params = ws.params
        params.model.recipe = recipe
        ws.write_params(params)
    run_id = str(flow_run.get_id() or "local")
    log_dir = ws.root / ".cogalign" / "logs" / run_id
    stages = pipeline_stages(ws.root)  # opening DVC's index costs about a second: once per run
    nodes = {n.name: n for n in stages}
    selected = select_stages(stages, until=until, from_stage=from_stage)
    forced = set(selected) if (force or from_stage) else set()
    results = []
    for name in selected:
        node = nodes[name]
        result = dvc_stage(str(ws.root), name, node.gpus, str(log_dir), force=name in forced)
        logger.info("%s: %s in %.1fs on %s", name, "ran" if result["ran"] else "up to date", result["seconds"],
                    result["devices"])
        _publish_stage_artifact(ws, name, node.outs, result)
        if name == "evaluate":
            _publish_evaluation(ws)
        results.append(result)
    return {"flow_run_id": run_id, "stages": results}


def _artifact_key(name: str) -> str:
    return "stage-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def _publish_stage_artifact(ws: Workspace, name: str, outs: tuple[str, ...], result: dict[str, object]) -> None:
    """Markdown artifact: what ran, on which device, output hashes (dvc.lock) and the stage's counts."""
    lock = ws.lock_stages().get(name, {})
    lines = [f"### {name}", "", f"- status: {'ran' if result['ran'] else 'up to date'}",
             f"- seconds: {result['seconds']}", f"- devices: {result['devices']}", "", "| output | md5 |",
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
