"""The spine end to end: init -> ingest -> annotate through Prefect + DVC, reruns, new batches."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from PIL import Image

from cogalign.dag import pipeline_stages, upstream_closure
from cogalign.runner import run_pipeline, workspace_lock
from cogalign.workspace import Workspace, WorkspaceError, register
from cogalign_core import tables
from tests.conftest import SAMPLE, copy_workspace


def test_run_writes_tables_lock_and_commit(spine_workspace: Path) -> None:
    ws = Workspace.open(spine_workspace)
    for rel in ("data/ingest/samples.parquet", "data/ingest/quarantine.parquet",
                "data/annotate/annotations.parquet", "dvc.lock"):
        assert (ws.root / rel).is_file(), rel
    message = ws.git("log", "-1", "--format=%B").stdout
    assert message.startswith("cogalign run ") and "flow-run-id:" in message
    assert ws.git("status", "--porcelain", "--", "dvc.lock", "params.yaml").stdout == ""
    runs = list((ws.root / ".cogalign" / "runs").glob("*.json"))
    assert runs and json.loads(runs[0].read_text())["revision"]


def test_second_run_is_up_to_date(spine_workspace: Path, tmp_path: Path) -> None:
    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    # Only the stages that ran are current; ask about exactly those: no Prefect run is started.
    outcome = run_pipeline(ws, until="annotate")
    assert outcome.up_to_date and outcome.flow_run_id is None


def test_dvc_dag_and_stage_order(spine_workspace: Path) -> None:
    ws = Workspace.open(spine_workspace)
    stages = pipeline_stages(ws.root)
    names = [s.name for s in stages]
    assert names[:3] == ["ingest_batch@b0001", "ingest", "annotate"]
    assert names.index("masks") < names.index("counterfactual") < names.index("rl") < names.index("evaluate")
    assert [s.name for s in upstream_closure(stages, "annotate")] == names[:3]
    dag = ws.dvc("dag").stdout
    for stage in ("ingest_batch@b0001", "annotate", "sft", "rl_no_cf", "evaluate"):
        assert stage in dag


def test_tables_round_trip_with_schema_and_readers(spine_workspace: Path) -> None:
    path = spine_workspace / "data/annotate/annotations.parquet"
    table = tables.read_table(path, "annotations")
    assert table.schema.equals(tables.ANNOTATIONS, check_metadata=False)
    frame = pl.read_parquet(path)
    assert frame.height == table.num_rows > 250
    assert set(frame["split"].unique()) <= {"train", "val", "test"}
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(path), split="train")
    assert ds.num_rows == table.num_rows and "diagnosis" in ds.column_names


def test_no_group_or_near_duplicate_cluster_spans_splits(spine_workspace: Path) -> None:
    ann = pl.read_parquet(spine_workspace / "data/annotate/annotations.parquet")
    samples = pl.read_parquet(spine_workspace / "data/ingest/samples.parquet")
    joined = ann.join(samples.select("sample_id", "near_dup_cluster", "group_id_hash"), on="sample_id")
    for key in ("group_key", "near_dup_cluster"):
        per = joined.group_by(key).agg(pl.col("split").n_unique().alias("n"))
        assert per["n"].max() == 1, key
    seq = joined.filter(pl.col("group_id_hash").is_not_null()).group_by("group_id_hash").agg(
        pl.col("split").n_unique().alias("n"))
    assert seq.height >= 7 and seq["n"].max() == 1  # every CVC sequence sits in one split


def _new_batch(dst: Path, n: int = 8) -> Path:
    """A new batch of real images: sample frames rotated 90 degrees (new pixels, same content kind)."""
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for img in sorted((SAMPLE / "kvasir-seg" / "images").glob("*.jpg"))[:n]:
        with Image.open(img) as im:
            im.transpose(Image.Transpose.ROTATE_90).save(dst / "images" / img.name, quality=92)
        with Image.open(SAMPLE / "kvasir-seg" / "masks" / f"{img.stem}.png") as m:
            m.transpose(Image.Transpose.ROTATE_90).save(dst / "masks" / f"{img.stem}.png")
    return dst


def test_adding_a_batch_reruns_only_its_work_and_moves_no_split(spine_workspace: Path, tmp_path: Path) -> None:
    root = copy_workspace(spine_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    before = {r["sample_id"]: r for r in tables.read_rows(root / "data/annotate/annotations.parquet")}
    batch = register(ws, _new_batch(tmp_path / "kvasir-seg-new"))
    assert batch == "b0002"
    outcome = run_pipeline(root, until="annotate")
    ran = {s["stage"]: s["ran"] for s in outcome.stages}
    assert ran == {"ingest_batch@b0001": False, "ingest_batch@b0002": True, "ingest": True, "annotate": True}
    after = {r["sample_id"]: r for r in tables.read_rows(root / "data/annotate/annotations.parquet")}
    assert len(after) == len(before) + 8
    assert all(after[sid]["split"] == row["split"] and after[sid]["group_key"] == row["group_key"]
               for sid, row in before.items())
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "ingest_batch@b0002" in lock


def test_code_fingerprint_change_makes_stage_stale(spine_workspace: Path, tmp_path: Path) -> None:
    root = copy_workspace(spine_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    ws.update_fingerprints()
    ws.commit("sync fingerprints")
    assert ws.update_fingerprints() == []
    lock_before = (root / "dvc.lock").read_text()
    (root / "code" / "annotate.json").write_text('{"package_version": "older"}\n')
    status = json.loads(ws.dvc("status", "--json").stdout)
    assert "annotate" in status
    assert ws.update_fingerprints() == ["annotate"]
    assert (root / "dvc.lock").read_text() == lock_before


def test_second_concurrent_run_is_refused(spine_workspace: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = copy_workspace(spine_workspace, tmp_path / "ws")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom cogalign.workspace import Workspace, workspace_lock\n"
        f"with workspace_lock(Workspace.open({str(root)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(WorkspaceError, match=f"another cogalign command .* pid {holder.pid} running"):
            run_pipeline(root, until="annotate")
        # Within one process the lock is re-entrant: a locked command may run the pipeline itself.
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(Workspace.open(root)):
        assert run_pipeline(root, until="annotate").up_to_date


def test_push_sends_outputs_but_never_the_raw_zone(spine_workspace: Path, tmp_path: Path) -> None:
    import hashlib

    from cogalign.workspace import push

    root = copy_workspace(spine_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    remote = tmp_path / "remote"
    ws.dvc("remote", "modify", "local", "url", str(remote))
    push(ws)
    pushed = {p.name for p in remote.rglob("*") if p.is_file()}
    assert pushed, "stage outputs reach the remote"
    raw = yaml.safe_load((root / "data/raw/b0001.dvc").read_text())["outs"][0]
    assert raw["push"] is False
    # The raw batch's directory manifest (and its batch.json record) exist only in the raw zone.
    assert raw["md5"][2:] not in pushed, "the raw batch was pushed"
    batch_json = root / "data/raw/b0001/batch.json"
    assert hashlib.md5(batch_json.read_bytes()).hexdigest()[2:] not in pushed
