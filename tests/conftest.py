"""Shared fixtures: one Prefect test server per session, and workspaces run once and shared.

Read-only tests use the session workspaces directly; tests that change a workspace take a copy
(``copy_workspace``), so the expensive runs happen once per session.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TINY = "tiny"  # the fast recipe: pipeline tests run it; the default (lite0-small) has its own tests
SALT = "test-salt-" + "0" * 32


COGALIGN = str(Path(sys.executable).parent / "cogalign")  # the CLI of the interpreter running the tests


def cli_env() -> dict[str, str]:
    """Environment for a ``cogalign`` child process: offline, the session's Prefect server (no
    ephemeral server per run), and a wide console so rich never wraps a one-paragraph error."""
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PREFECT_LOGGING_LEVEL="WARNING",
                COLUMNS="1000", PREFECT_API_URL=str(PREFECT_API_URL.value()))

@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def spine_workspace(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample, initialised and run through ingest + annotate (read-only for tests)."""
    from cogalign.runner import run_pipeline
    from cogalign.workspace import init_workspace

    root = tmp_path_factory.mktemp("spine") / "ws"
    init_workspace(root, sample=True, salt=SALT, recipe=TINY)
    outcome = run_pipeline(root, until="annotate")
    assert not outcome.up_to_date and outcome.revision
    return root


def copy_workspace(src: Path, dst: Path) -> Path:
    """A private copy of a workspace (git, DVC cache and outputs), safe to modify."""
    shutil.copytree(src, dst, symlinks=True)
    for stale in (dst / ".cogalign" / "workspace.lock", dst / ".dvc" / "tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="session")
def full_workspace(spine_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline (tiny recipes) run once on the bundled sample (read-only for tests)."""
    from cogalign.runner import run_pipeline

    root = copy_workspace(spine_workspace, tmp_path_factory.mktemp("full") / "ws")
    outcome = run_pipeline(root)
    assert outcome.revision
    return root


@pytest.fixture(scope="session")
def stage_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Annotation, mask and counterfactual tables made by the real data stages on 24 images per dataset
    of the sample (no git/DVC/Prefect). Read-only: training tests work on ``copy_stage_tables``."""
    from cogalign_core.config import PipelineParams
    from cogalign_core.sample_workspace import build_stage_tables

    root = tmp_path_factory.mktemp("stage-tables") / "ws"
    params = PipelineParams.model_validate({"privacy": {"salt": SALT}, "model": {"recipe": TINY},
                                            "masks": {"qc_segmenters": ["box_ellipse"]}})
    build_stage_tables(root, per_dataset=24, params=params)
    return root


def copy_stage_tables(src: Path, dst: Path) -> Path:
    """A private copy of the stage tables directory."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
