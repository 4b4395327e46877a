"""The end-of-run report: per-stage lines and warnings read back from each stage's summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from cogalign_core import accounting, contract


def _write(root: Path, stage: str, text: str) -> None:
    path = root / str(contract.summary_path(stage))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_report_lines_warnings_and_an_unreadable_summary(tmp_path: Path) -> None:
    _write(tmp_path, "masks", json.dumps({accounting.KEY: accounting.block("samples", 10, 2, {"mask_empty": 8})}))
    _write(tmp_path, "counterfactual", "")  # truncated by hand: the report says so instead of crashing
    report = accounting.run_report(tmp_path, ["masks", "counterfactual", "evaluate"], [], 0.75)
    assert report.lines == ["masks: 10 samples in, 2 out, 8 dropped (mask_empty 8)"]
    assert report.warnings[0].startswith("masks dropped 8 of 10 samples (80%, more than 75%)")
    assert report.warnings[1].startswith("counterfactual: no counts, its summary is unreadable (data/counterfactual/")
    assert len(report.warnings) == 2
