"""Fault tolerance: SIGKILL-and-resume, concurrent runs, atomic writes, permanent stage errors.

The runs are real ``cogalign run`` processes (their own session, like an operator's shell) talking
to the session's Prefect test server; the reference for "same outputs" is the uninterrupted
``spine_workspace`` run made with the same salt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cogalign.processes import PID_FILE
from cogalign.workspace import init_workspace
from cogalign_core.io import TMP_PREFIX, remove_stale_temps
from tests.conftest import copy_workspace

SALT = "test-salt-" + "0" * 32  # the spine_workspace salt: same inputs -> same dvc.lock
COGALIGN = str(Path(sys.executable).parent / "cogalign")


def _env() -> dict[str, str]:
    """Child environment pointing at the session's Prefect server (no ephemeral server per run)."""
    from prefect.settings import PREFECT_API_URL

    # COLUMNS: rich must not wrap the one-paragraph error (and its log path) at 80 columns.
    env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PREFECT_LOGGING_LEVEL="WARNING",
               COLUMNS="1000")
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return env


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COGALIGN, *args], env=_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _start_run(ws: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([COGALIGN, "run", "--workspace", str(ws), *args], env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _processes_in(ws: Path) -> list[str]:
    """Live processes (other than this one) whose working directory is inside ``ws``."""
    root, found = ws.resolve(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            found.append(f"{entry.name}: {cmd[:160]}")
    return found


def _temps(ws: Path) -> list[Path]:
    return sorted((ws / "data").rglob(f"{TMP_PREFIX}*"))


def _stage_command_running(stage: str) -> bool:
    needle = f"cogalign_core.stage {stage}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                    return True
            except OSError:
                continue
    return False


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _lock_stages(ws: Path) -> dict[str, object]:
    return yaml.safe_load((ws / "dvc.lock").read_text())["stages"]


@pytest.mark.timeout(420)
def test_sigkill_during_a_stage_then_resume_matches_an_uninterrupted_run(
        spine_workspace: Path, tmp_path: Path) -> None:
    ws = init_workspace(tmp_path / "ws", sample=True, salt=SALT).root
    log = tmp_path / "killed.log"
    run = _start_run(ws, "--until", "annotate", log=log)
    try:
        # Kill inside `annotate` (the last stage): earlier stages are recorded in dvc.lock by then.
        _wait(lambda: (ws / PID_FILE).exists() and '"annotate"' in (ws / PID_FILE).read_text(), 200,
              "the annotate stage", run, log)
        _wait(lambda: _stage_command_running("annotate"), 30, "the annotate stage command", run, log)
        deadline = time.monotonic() + 1.5  # mid-stage: at its first temp file, or 1.5 s in
        while time.monotonic() < deadline and not _temps(ws):
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)  # the whole CLI process group, as `kill -9 -PGID` would
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    # Stage processes end with the run (their supervisor got the parent-death signal).
    _wait(lambda: not _processes_in(ws), 15, "stage processes to end after the kill")
    # No partial output: whatever the stage published before the kill is a complete file (atomic
    # renames); on a fast machine annotations.parquet may already be whole when the kill lands.
    published = ws / "data/annotate/annotations.parquet"
    if published.exists():
        import pyarrow.parquet as pq

        assert pq.read_table(published).num_rows > 0
    assert (ws / PID_FILE).exists()  # the pid file survives a SIGKILL; the next start uses it

    resumed = _cli("run", "--workspace", str(ws), "--until", "annotate")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = {line.split()[1]: line.split()[3] for line in resumed.stdout.splitlines()
            if line.startswith("│") and len(line.split()) > 3}
    # Only the interrupted stage reran; the finished ones were up to date.
    assert rows == {"ingest_batch@b0001": "up", "ingest": "up", "annotate": "ran"}, resumed.stdout
    assert _lock_stages(ws) == _lock_stages(spine_workspace)  # same outputs, same hashes
    assert _temps(ws) == [] and not (ws / PID_FILE).exists()
    assert _processes_in(ws) == []


@pytest.mark.timeout(420)
def test_second_run_on_a_busy_workspace_refuses_or_waits(spine_workspace: Path, tmp_path: Path) -> None:
    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    lock_before = _lock_stages(ws)
    log = tmp_path / "first.log"
    first = _start_run(ws, "--until", "annotate", "--force", log=log)
    try:
        _wait(lambda: (ws / PID_FILE).exists(), 200, "the first run's first stage", first, log)
        refused = _cli("run", "--workspace", str(ws), "--until", "annotate")
        assert refused.returncode == 2
        assert "another cogalign command" in refused.stderr and "--wait" in refused.stderr
        assert f"pid {first.pid} running `cogalign run" in refused.stderr  # names the holder
        waited = _cli("run", "--workspace", str(ws), "--until", "annotate", "--wait")
        # --wait returns only after the first run released the lock, and then finds everything done.
        assert first.poll() is not None and first.returncode == 0, log.read_text()[-3000:]
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "up to date" in waited.stdout
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert _lock_stages(ws) == lock_before  # forced rerun reproduced the same outputs
    status = _cli("status", "--workspace", str(ws))
    assert status.returncode == 0
    fsck = subprocess.run(["git", "fsck", "--no-progress"], cwd=ws, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    assert _temps(ws) == [] and _processes_in(ws) == []


def test_permanent_stage_error_stops_with_a_one_paragraph_summary(spine_workspace: Path, tmp_path: Path) -> None:
    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    samples = ws / "data/ingest/samples.parquet"
    data = samples.read_bytes()
    samples.unlink()  # break the cache link, then corrupt the stage input (a truncated table)
    samples.write_bytes(data[: len(data) // 3])
    out = _cli("run", "--workspace", str(ws), "--from", "annotate", "--until", "annotate")
    assert out.returncode == 2, out.stdout + out.stderr
    (message,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert "stage 'annotate' failed (permanent)" in message
    assert "ArrowInvalid" in message and "Parquet" in message  # the cause: the stage's own exception
    log_path = Path(message.rsplit("Full log: ", 1)[1].strip())
    assert log_path.is_file() and "Traceback" in log_path.read_text()
    assert _task_run_counts(log_path.parent.name) == [1]  # a permanent error is not retried
    assert _processes_in(ws) == [] and not (ws / PID_FILE).exists()


def _task_run_counts(flow_run_id: str) -> list[int]:
    """How many times each task of a flow run ran (Prefect counts retries in ``run_count``)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return [r.run_count for r in runs]


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cogalign_core.io import atomic_dir, atomic_path
    target, kind = Path(sys.argv[1]), sys.argv[2]
    if kind == "file":
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            fh.write(b"new" * 100_000); fh.flush()
            print("writing", flush=True); time.sleep(60)
    else:
        with atomic_dir(target) as tmp:
            (tmp / "a.bin").write_bytes(b"new" * 100_000)
            print("writing", flush=True); time.sleep(60)
""")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_writer_killed_mid_write_leaves_old_artifact_and_only_removable_temps(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out" / ("table.parquet" if kind == "file" else "model")
    target.parent.mkdir()
    if kind == "file":
        target.write_bytes(b"old")
    else:
        target.mkdir()
        (target / "a.bin").write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), kind], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    # Readers see the old artifact whole; the partial one exists only as a temp sibling.
    assert (target.read_bytes() if kind == "file" else (target / "a.bin").read_bytes()) == b"old"
    temps = [p for p in target.parent.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(temps) == 1
    assert remove_stale_temps(target.parent) == temps
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
