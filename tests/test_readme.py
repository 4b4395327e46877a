"""Docs that run: every `cogalign` (and `dvc`) command line of README.md is executed as written against a
workspace, and every `-S key=value` in README.md and docs/ is a valid override.

Paths in the README are placeholders mapped to test folders: ``/data/cogalign-ws`` and ``workspace``
are one workspace, ``/mnt/new-endoscopy`` and ``/mnt/other-hospital`` are small raw folders,
``<sample_id>`` is a real sample. ``cogalign init`` runs as written into an empty folder; the commands
after it run, in README order, on a copy of the session's fully run workspace (the tiny recipe), so the
suite does not train the default recipe's models once more. The quick-start scripts are CI's own
entry point (.ci/run) and are not run here.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign.runner import overridden
from cogalign_core import contract, tables
from cogalign_core.config import PipelineParams
from tests.conftest import REPO, SAMPLE, copy_workspace

README = REPO / "README.md"
WS = "workspace"
PLACEHOLDERS = {"/data/cogalign-ws": WS, "--workspace W ": f"--workspace {WS} "}
SKIPPED = ("bash scripts/", ". .venv/bin/activate")


def readme_commands() -> list[str]:
    """Command lines of the README's bash blocks, comments stripped, in order."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith(SKIPPED):
                lines.append(command)
    return lines


def _kvasir(dst: Path, start: int, n: int, mirror: bool) -> Path:
    """``n`` Kvasir-SEG images with masks as a seg folder; mirrored ones are new images, others duplicates."""
    images = sorted((SAMPLE / "kvasir-seg" / "images").iterdir())[start:start + n]
    for img in images:
        mask = next((SAMPLE / "kvasir-seg" / "masks").glob(img.stem + ".*"))
        for src, sub in ((img, "images"), (mask, "masks")):
            (dst / sub).mkdir(parents=True, exist_ok=True)
            if mirror:
                Image.fromarray(np.asarray(Image.open(src))[:, ::-1].copy()).save(dst / sub / f"{src.stem}.png")
            else:
                shutil.copy(src, dst / sub / src.name)
    return dst


def _expand(command: str, values: dict[str, str]) -> str:
    for placeholder, value in {**PLACEHOLDERS, **values}.items():
        command = command.replace(placeholder, value)
    return command


def _cogalign(command: str) -> str:
    result = CliRunner().invoke(app, shlex.split(command)[1:], catch_exceptions=False)
    assert result.exit_code == 0, f"`{command}` failed:\n{result.output}"
    return result.output


def test_readme_lists_the_commands_an_operator_needs() -> None:
    commands = readme_commands()
    verbs = {shlex.split(c)[1] for c in commands if c.startswith("cogalign ")}
    assert {"init", "ingest", "status", "run", "lineage", "compare", "quarantine"} <= verbs
    assert all(c.startswith(("cogalign ", "cd ", "xdg-open ")) for c in commands), commands


@pytest.mark.slow
def test_every_readme_command_runs_as_written(full_workspace: Path, tmp_path: Path) -> None:
    commands = readme_commands()
    init, rest = commands[0], commands[1:]
    assert init.startswith("cogalign init ")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with contextlib.chdir(fresh):
        _cogalign(_expand(init, {}))
    assert (fresh / WS / "dvc.yaml").is_file() and (fresh / WS / "data/raw/b0001.dvc").is_file()

    here = tmp_path / "here"
    here.mkdir()
    copy_workspace(full_workspace, here / WS)
    sample_id = tables.read_rows(here / WS / contract.SAMPLES)[0]["sample_id"]
    values = {"/mnt/new-endoscopy": str(_kvasir(tmp_path / "new-endoscopy", 0, 3, mirror=False)),
              "/mnt/other-hospital": str(_kvasir(tmp_path / "other-hospital", 3, 4, mirror=True)),
              "<sample_id>": sample_id}
    outputs: dict[str, str] = {}
    with contextlib.chdir(here):
        for raw in rest:
            command = _expand(raw, values)
            if command.startswith("cogalign study "):
                # Hours of training as written: checked and planned here; tests/test_study.py runs a study.
                outputs[raw] = _cogalign(command + " --dry-run")
                assert "standard-s2: dvc exp run --temp" in outputs[raw], outputs[raw]
            elif command.startswith("cogalign "):
                outputs[raw] = _cogalign(command)
            elif command.startswith("xdg-open "):
                assert Path(command.split()[1]).is_file(), command
            else:
                done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"`{command}` failed:\n{done.stdout}\n{done.stderr}"
    assert len(outputs) >= 10
    run = next(o for c, o in outputs.items() if c.endswith("cogalign run --workspace /data/cogalign-ws"))
    assert "warning:" not in run and re.search(r"ingest_batch@b0003: \d+ files in", run), run
    assert "up to date" in next(o for c, o in outputs.items() if c.endswith("--until annotate"))
    assert re.search(r"ingest_batch@b0001: \d+ files in", next(o for c, o in outputs.items() if " -S " in c))


def _overrides(text: str) -> list[str]:
    return re.findall(r"-S\s+([\w.]+=[^\s`]+)", text)


def test_every_override_in_the_docs_is_a_real_parameter() -> None:
    found = {}
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for item in _overrides(doc.read_text()):
            key, value = item.split("=", 1)
            if key != "key.path":  # the syntax line itself
                found[item] = doc.name
    assert len(found) >= 4, found
    for item in found:
        key, value = item.split("=", 1)
        overridden(PipelineParams(), {key: value})  # raises WorkspaceError on an unknown key or bad value
    with pytest.raises(Exception, match="unknown parameter"):
        overridden(PipelineParams(), {"counterfactual.dilation_fraction": "0.2"})
