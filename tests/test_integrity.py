"""Faults that fail loudly: corrupted DVC cache objects, bit rot, a stage killed mid-output, a disk
that fills under a stage's log, and run records that name their own commit.

All on real workspaces (the session's spine workspace, the real data-stage tables) with real
``cogalign`` processes where the command line is what an operator sees.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cogalign.integrity import verify
from cogalign.processes import failure_cause
from cogalign.runner import run_pipeline
from cogalign.workspace import Workspace
from cogalign_core.io import TMP_PREFIX, remove_stale_temps, sha256_file
from tests.conftest import COGALIGN, cli_env, copy_stage_tables, copy_workspace


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COGALIGN, *args], env=cli_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _cache_object(ws: Path, stage: str, out: str, rel: str) -> Path:
    """Cache object of file ``rel`` inside directory output ``out`` of ``stage`` (from dvc.lock)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"][stage]
    dir_md5 = next(o["md5"] for o in lock["outs"] if o["path"] == out)
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    listing = json.loads((cache / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == rel)
    return cache / md5[:2] / md5[2:]


def _garble(path: Path, keep_stamp: bool = False) -> None:
    """Overwrite 16 bytes in the middle of ``path`` (optionally keeping its size and mtime: bit rot)."""
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
    with open(path, "r+b") as fh:  # in place: same inode, as a disk error would leave it
        fh.write(data)
    path.chmod(st.st_mode & 0o777)
    if keep_stamp:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.timeout(420)
def test_corrupted_cache_object_is_reported_by_status_run_and_verify(spine_workspace: Path, tmp_path: Path) -> None:
    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    obj = _cache_object(ws, "annotate", "data/annotate", "annotations.parquet")
    _garble(obj)
    # DVC checks the garbled object out without a word (the silent path of the issue).
    (ws / "data/annotate/annotations.parquet").unlink()
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "-q", "data/annotate"], cwd=ws, check=True,
                   env=cli_env(), capture_output=True)
    lock_before = (ws / "dvc.lock").read_text()
    named = "data/annotate/annotations.parquet"

    status = _cli("status", "--workspace", str(ws))
    assert status.returncode == 1 and "up to date" not in status.stdout
    assert named in status.stderr and "corrupted" in status.stderr and str(obj.relative_to(ws)) in status.stderr

    run = _cli("run", "--workspace", str(ws), "--until", "annotate")
    assert run.returncode == 2 and named in run.stderr and "nothing was run" in run.stderr, run.stdout + run.stderr
    assert (ws / "dvc.lock").read_text() == lock_before

    full = _cli("verify", "--workspace", str(ws), "--full")
    assert full.returncode == 1
    assert f"{named} (output of annotate): cache object is corrupted" in full.stderr
    assert f"{named} (output of annotate): workspace copy differs from dvc.lock" in full.stderr

    repaired = _cli("verify", "--workspace", str(ws), "--repair")
    assert repaired.returncode == 1 and named in repaired.stdout
    rerun = _cli("run", "--workspace", str(ws), "--until", "annotate")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    again = _cli("verify", "--workspace", str(ws), "--full")
    assert again.returncode == 0, again.stderr
    # Rebuilt to exactly the recorded outputs.
    assert (yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
            == yaml.safe_load(lock_before)["stages"])


def test_full_verify_finds_bit_rot_that_kept_size_and_mtime(spine_workspace: Path, tmp_path: Path) -> None:
    ws = Workspace(copy_workspace(spine_workspace, tmp_path / "ws"))
    assert verify(ws).ok  # records every object as verified
    obj = _cache_object(ws.root, "ingest_batch@b0001", "data/ingest/batches/b0001", "records.parquet")
    _garble(obj, keep_stamp=True)
    report = verify(ws, full=True)
    assert [(p.kind, p.path) for p in report.problems] == [
        ("corrupt_object", "data/ingest/batches/b0001/records.parquet"),
        ("modified_output", "data/ingest/batches/b0001/records.parquet")] or \
        [(p.kind, p.path) for p in report.problems] == [
        ("corrupt_object", "data/ingest/batches/b0001/records.parquet")]  # a copy-type cache keeps it intact
    assert report.objects_hashed == report.objects


_NOISY_FAILING_STAGE = ("import sys\nfor i in range(20000): print('step', i, 'loss 0.123')\n"
                        "raise OSError(28, 'No space left on device', 'data/sft/model/model.safetensors')")


def test_failed_stage_log_keeps_the_exception_when_the_disk_fills(tmp_path: Path) -> None:
    log_path = tmp_path / "sft.log"

    def small_disk() -> None:  # the log may not grow past 100 kB: every write after that fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, "-m", "cogalign.processes", "--", sys.executable, "-c",
                               _NOISY_FAILING_STAGE], stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=small_disk).returncode
    text = log_path.read_text()
    assert code == 1 and len(text) <= 100_000
    assert "this log could not be written in full" in text
    assert failure_cause(text[-4000:], code) == \
        "OSError: [Errno 28] No space left on device: 'data/sft/model/model.safetensors'"


_WORKER_REQUEST = """
import os, subprocess, sys
from cogalign.stage_worker import _redirect
end = _redirect(sys.argv[1], sys.argv[1])  # how a DVC worker points a stage command at its log
code = subprocess.run([sys.executable, "-c", sys.argv[2]]).returncode
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
end()
sys.exit(code)
"""


def test_stage_log_written_by_a_dvc_worker_keeps_the_exception_when_the_disk_fills(tmp_path: Path) -> None:
    log_path = tmp_path / "sft.log"
    log_path.write_text("earlier attempt\n")

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    code = subprocess.run([sys.executable, "-c", _WORKER_REQUEST, str(log_path), _NOISY_FAILING_STAGE],
                          preexec_fn=small_disk).returncode
    text = log_path.read_text()
    assert code == 1 and len(text) <= 100_000 and text.startswith("earlier attempt\n")  # appended, not replaced
    assert "this log could not be written in full" in text
    assert failure_cause(text[-4000:], code) == \
        "OSError: [Errno 28] No space left on device: 'data/sft/model/model.safetensors'"


def test_run_record_names_its_own_commit_or_none(spine_workspace: Path, tmp_path: Path) -> None:
    root = copy_workspace(spine_workspace, tmp_path / "ws")
    ws = Workspace.open(root)
    ws.git("commit", "-q", "--allow-empty", "-m", "someone else's commit")
    outcome = run_pipeline(root, from_stage="ingest", until="ingest", commit=False)
    assert not outcome.up_to_date and outcome.revision is None
    record = json.loads((root / ".cogalign/runs" / f"{outcome.flow_run_id}.json").read_text())
    assert record["revision"] == "no commit" and record["committed"] is False


@pytest.mark.timeout(300)
def test_counterfactual_killed_midway_leaves_its_previous_output_whole(stage_tables: Path, tmp_path: Path) -> None:
    ws = copy_stage_tables(stage_tables, tmp_path / "ws")
    out = ws / "data" / "counterfactual"
    before = {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    every_file = {p for p in (ws / "data").rglob("*") if p.is_file()}
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["counterfactual"]["inpaint_radius"] = 9  # every derived image changes
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = subprocess.Popen([sys.executable, "-m", "cogalign_core.stage", "counterfactual"], cwd=ws,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill at the first new derived image
            if any(p.suffix == ".png" and p not in every_file for p in (ws / "data").rglob("*.png")):
                break
            assert stage.poll() is None, stage.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the counterfactual stage wrote no new image")
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait(timeout=30)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    time.sleep(0.5)  # let killed pool workers be reaped
    assert {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    staged = list((ws / "data").glob(f"{TMP_PREFIX}*"))
    assert staged and remove_stale_temps(ws / "data") == staged
