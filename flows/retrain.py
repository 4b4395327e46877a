"""The scheduled retrain flow: drop folder -> new raw batch -> pipeline -> promotion decision.

The logic lives in :mod:`cogalign.retrain`; this flow runs it and publishes the outcome as Prefect
artifacts (the pipeline itself runs as the ``cogalign-end-to-end`` subflow).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cogalign.retrain import retrain_once


@flow(name="cogalign-retrain", log_prints=True)
def retrain(workspace: str, drop_folder: str, until: str | None = None) -> dict[str, Any]:
    """Take new files from ``drop_folder`` into ``workspace``, rerun what changed, gate the challenger.

    Args:
        workspace: workspace directory.
        drop_folder: folder where new clinical images land (files are recognised by content).
        until: stop the pipeline after this stage (no promotion decision unless evaluate ran).
    """
    logger = get_run_logger()
    outcome = retrain_once(workspace, drop_folder, until=until)
    if outcome.noop:
        logger.info("no-op: %s (%.1fs)", outcome.note, outcome.seconds)
    else:
        logger.info("batch %s; stages run: %s; %s", outcome.batch, ", ".join(outcome.ran_stages) or "none",
                    outcome.note or "decision recorded")
    _publish(outcome.to_dict())
    return outcome.to_dict()


def _publish(out: dict[str, Any]) -> None:
    """Markdown summary of the retrain and, when a decision was made, a table of its checks."""
    decision = out.get("decision")
    lines = ["### cogalign retrain", "",
             f"- outcome: {'no-op' if out['noop'] else 'ran'}",
             f"- new raw batch: {out.get('batch') or '-'}",
             f"- drop folder: `{json.dumps(out.get('drop') or {}, sort_keys=True)}`",
             f"- new batch ingest: `{json.dumps(out.get('new_batch_ingest'), sort_keys=True)}`",
             f"- stages run: {', '.join(out.get('ran_stages') or []) or '-'}"]
    if out.get("note"):
        lines.append(f"- note: {out['note']}")
    if decision:
        lines += ["", f"#### decision {decision['id']}: {'PROMOTED' if decision['promote'] else 'not promoted'}",
                  *[f"- {r}" for r in decision["reasons"]],
                  f"- record: `{out.get('decision_path')}`"]
        rows = [{k: c[k] for k in ("metric", "role", "champion", "challenger", "delta", "required", "passed", "note")}
                for c in decision["checks"]]
        if rows:
            create_table_artifact(key="retrain-promotion-checks", table=rows,
                                  description=f"promotion decision {decision['id']}")
    create_markdown_artifact(key="retrain-outcome", markdown="\n".join(lines), description="cogalign retrain")
