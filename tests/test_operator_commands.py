"""Operator commands on a real workspace: `cogalign status`, `run --from`, `--force`, `-S key=value`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign.workspace import Workspace
from tests.conftest import copy_workspace


@pytest.fixture()
def ws_copy(spine_workspace: Path, tmp_path: Path) -> Path:
    return copy_workspace(spine_workspace, tmp_path / "ws")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _ran(root: Path) -> dict[str, bool]:
    """stage -> ran, from the newest run record under .cogalign/runs."""
    import json

    runs = sorted((root / ".cogalign" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {s["stage"]: s["ran"] for s in json.loads(runs[-1].read_text())["stages"]}


def test_status_says_what_is_stale_and_why(ws_copy: Path) -> None:
    ws = Workspace.open(ws_copy)
    params = ws.params
    params.annotate.split.salt = "another-salt"
    ws.write_params(params)
    out = _cli("status", "--workspace", str(ws_copy))
    # The table wraps long cells: compare without whitespace and borders.
    flat = "".join(c for c in out if not c.isspace() and c not in "│┃")
    annotate_row = flat.split("annotatechangeddeps:", 1)[1].split("masks", 1)[0]
    assert '"params.yaml":{"annotate":"modified"}' in annotate_row, out
    # Stages never run (the spine stopped at annotate) are reported as well.
    assert "masks" in out


def test_set_override_from_and_force(ws_copy: Path) -> None:
    ws = Workspace.open(ws_copy)
    root = str(ws_copy)
    # -S: validated, written to params.yaml, reruns what depends on it, committed like any params change.
    _cli("run", "--workspace", root, "--until", "annotate", "-S", "annotate.split.salt=operator-salt")
    assert yaml.safe_load((ws_copy / "params.yaml").read_text())["annotate"]["split"]["salt"] == "operator-salt"
    assert _ran(ws_copy) == {"ingest_batch@b0001": False, "ingest": False, "annotate": True}
    assert "params.yaml" in ws.git("show", "--name-only", "--format=", "HEAD").stdout
    assert ws.git("status", "--porcelain", "--", "params.yaml", "dvc.lock").stdout == ""
    bad = CliRunner().invoke(app, ["run", "--workspace", root, "-S", "annotate.split.nope=1"])
    assert bad.exit_code == 2 and "unknown parameter" in bad.output
    bad = CliRunner().invoke(app, ["run", "--workspace", root, "-S", "annotate.split.train=2"])
    assert bad.exit_code == 2 and "invalid override" in bad.output

    # --from: that stage and everything after it rerun, though nothing changed.
    _cli("run", "--workspace", root, "--from", "annotate", "--until", "annotate")
    assert _ran(ws_copy) == {"annotate": True}
    # --force: rerun the selected stages even if DVC considers them current.
    _cli("run", "--workspace", root, "--force", "--until", "ingest_batch")
    assert _ran(ws_copy) == {"ingest_batch@b0001": True}
    # ... with byte-identical outputs (deterministic stages), so the lock does not move.
    assert ws.git("status", "--porcelain", "--", "dvc.lock").stdout == ""
