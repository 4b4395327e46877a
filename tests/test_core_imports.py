"""cogalign_core stays free of orchestration; data stages stay free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "cogalign_core"


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_core_sources_never_import_prefect_or_dvc() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and any(
                f" {mod}" in stripped.replace(".", " ") for mod in ("prefect", "dvc")
            ):
                offenders.append(f"{path.relative_to(CORE)}: {stripped}")
    assert offenders == []


@pytest.mark.parametrize("module", ["cogalign_core.ingest", "cogalign_core.annotate", "cogalign_core.stage",
                                    "cogalign_core.config", "cogalign_core.raw_batch"])
def test_data_stage_modules_import_without_torch_prefect_dvc(module: str) -> None:
    loaded = _imported_after(f"import {module}")
    assert not {m for m in loaded if m.split(".")[0] in {"torch", "transformers", "prefect", "dvc"}}


@pytest.mark.parametrize("module", ["cogalign_core.masks", "cogalign_core.rewards", "cogalign_core.train.sft",
                                    "cogalign_core.train.grpo"])
def test_gpu_box_modules_import_without_polars_prefect_dvc(module: str) -> None:
    loaded = _imported_after(f"import {module}")
    assert not {m for m in loaded if m.split(".")[0] in {"polars", "prefect", "dvc"}}
