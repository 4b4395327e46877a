"""Scale-out: the fan-out stages give byte-identical outputs on a local Dask cluster and in one process."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest

from cogalign_core import counterfactual, masks
from cogalign_core.config import PipelineParams
from cogalign_core.executor import DASK_ADDRESS_ENV, WORKERS_ENV, default_workers, map_items
from tests.mask_workspace import build_workspace


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_map_items_on_a_local_dask_cluster_keeps_input_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DASK_ADDRESS_ENV, "local")
    items = list(range(23))[::-1]
    out = map_items(_square_and_pid, items, workers=2)
    assert [v for v, _ in out] == [x * x for x in items]
    assert os.getpid() not in {pid for _, pid in out}  # really ran in the cluster's worker processes


def test_workers_environment_overrides_the_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert default_workers(8) == 3
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=WORKERS_ENV):
        default_workers(0)
    monkeypatch.delenv(WORKERS_ENV)
    assert default_workers(5) == 5


def _run_stages(ws: Path, params: PipelineParams) -> dict[str, str]:
    """Run masks then counterfactual in ``ws``; return {relative path: sha256} of their outputs."""
    with contextlib.chdir(ws):  # stages run with the workspace as cwd, as under DVC
        masks.run_stage(ws, params, None)
        counterfactual.run_stage(ws, params, None)
    out = {}
    for sub in ("data/masks", "data/counterfactual"):
        for p in sorted((ws / sub).rglob("*")):
            if p.is_file():
                out[p.relative_to(ws).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.timeout(600)
def test_masks_and_counterfactual_identical_on_dask_and_single_process(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    single_ws, dask_ws = tmp_path / "single" / "ws", tmp_path / "dask" / "ws"
    for ws in (single_ws, dask_ws):
        build_workspace(ws, kvasir=4, cvc=2, normal=1)
    # Same params.yaml for both (outputs record their params); parallelism comes from the environment.
    params = PipelineParams()
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    monkeypatch.setenv(WORKERS_ENV, "1")  # one process: map_items runs the items serially in-process
    single = _run_stages(single_ws, params)
    monkeypatch.setenv(DASK_ADDRESS_ENV, "local")
    monkeypatch.setenv(WORKERS_ENV, "2")  # a local Dask cluster of 2 worker processes
    on_dask = _run_stages(dask_ws, params)
    assert any(k.endswith("counterfactuals.parquet") for k in single)
    assert any(k.startswith("data/counterfactual/images/") for k in single)  # real images were made
    assert any(k.endswith("masks.parquet") for k in single)
    assert on_dask == single
