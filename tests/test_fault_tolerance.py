"""Fault tolerance: SIGKILL-and-resume, concurrent runs, atomic writes, permanent stage errors.

The runs are real ``cogalign run`` processes (their own session, like an operator's shell) talking
to the session's Prefect test server; the reference for "same outputs" is the uninterrupted
``spine_workspace`` run made with the same salt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cogalign.processes import groups_dir, kill_stale_groups, record_group
from cogalign.workspace import init_workspace
from cogalign_core.io import TMP_PREFIX, remove_stale_temps
from tests.conftest import COGALIGN, cli_env, copy_workspace

SALT = "test-salt-" + "0" * 32  # the spine_workspace salt: same inputs -> same dvc.lock



def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COGALIGN, *args], env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _start_run(ws: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([COGALIGN, "run", "--workspace", str(ws), *args], env=cli_env(), stdout=fh,
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


def _pids_running(needle: str, ws: Path | None = None) -> list[int]:
    """Pids whose command line contains ``needle`` (and whose cwd is ``ws``, when given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle.encode() not in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                continue
            if ws is not None and Path(os.readlink(entry / "cwd")) != ws.resolve():
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def _state(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _stop_when_started(needle: str, ws: Path) -> list[int]:
    """SIGSTOP every process running ``needle`` in ``ws`` (a shell and its command alike); every pid
    signalled, once each is seen stopped (empty while there is none yet).

    SIGSTOP is delivered asynchronously: a pid read back as still running right after the signal is
    stopped a moment later, so it is waited for and returned too (else nobody would SIGCONT it)."""
    signalled = []
    for pid in _pids_running(needle, ws):
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        signalled.append(pid)
    deadline = time.monotonic() + 10
    while any(_state(pid) not in ("T", "t", None, "Z", "X") for pid in signalled):
        if time.monotonic() > deadline:
            pytest.fail(f"SIGSTOP not delivered within 10 s to {signalled}")
        time.sleep(0.01)
    return [pid for pid in signalled if _state(pid) in ("T", "t")]


def _alive(pid: int) -> bool:
    """A running (or stopped) process; a zombie waiting to be reaped counts as ended."""
    return _state(pid) not in (None, "Z", "X")


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _lock_stages(ws: Path) -> dict[str, object]:
    return yaml.safe_load((ws / "dvc.lock").read_text())["stages"]


def _prefect_servers_of(ws: Path) -> list[int]:
    """Live Prefect API servers whose home is ``ws``'s (wherever their working directory is)."""
    home = f"PREFECT_HOME={ws.resolve()}/".encode()
    found = []
    for pid in _pids_running("prefect.server.api.server:create_app"):
        try:
            if home in (Path("/proc") / str(pid) / "environ").read_bytes() and _alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.timeout(420)
def test_sigkill_during_a_stage_then_resume_matches_an_uninterrupted_run(
        spine_workspace: Path, tmp_path: Path) -> None:
    ws = init_workspace(tmp_path / "ws", sample=True, salt=SALT).root
    log = tmp_path / "killed.log"
    env = {k: v for k, v in cli_env().items() if k != "PREFECT_API_URL"}  # the run starts its own Prefect server
    with open(log, "wb") as fh:
        run = subprocess.Popen([COGALIGN, "run", "--workspace", str(ws), "--until", "annotate"], env=env, stdout=fh,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # Freeze `annotate` (the last stage) as soon as its command exists: it cannot finish before the
        # kill, whatever the machine's speed, and the earlier stages are recorded in dvc.lock by then.
        stopped = _wait(lambda: _stop_when_started("cogalign_core.stage annotate", ws), 300,
                        "the annotate stage command", run, log)
        assert _prefect_servers_of(ws), "the run's own Prefect server is up"
        os.kill(run.pid, signal.SIGKILL)  # the run process alone: its children must follow it by themselves
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    # Every process of the killed run ends with it: stage workers, the frozen stage command, the server.
    _wait(lambda: not _processes_in(ws) and not _prefect_servers_of(ws), 30,
          "the killed run's processes (stage, workers, server) to end")
    assert not _prefect_servers_of(ws) and not any(_alive(pid) for pid in stopped)
    # No partial output: whatever the stage published before it was frozen is a complete file (atomic
    # renames); DVC never recorded the stage, since its command never finished.
    published = ws / "data/annotate/annotations.parquet"
    if published.exists():
        import pyarrow.parquet as pq

        assert pq.read_table(published).num_rows > 0
    assert "annotate" not in _lock_stages(ws)

    resumed = _cli("run", "--workspace", str(ws), "--until", "annotate")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = {line.split()[1]: line.split()[3] for line in resumed.stdout.splitlines()
            if line.startswith("│") and len(line.split()) > 3}
    # Only the interrupted stage reran; the finished ones were up to date.
    assert rows == {"ingest_batch@b0001": "up", "ingest": "up", "annotate": "ran"}, resumed.stdout
    assert _lock_stages(ws) == _lock_stages(spine_workspace)  # same outputs, same hashes
    assert _temps(ws) == [] and not list(groups_dir(ws).glob("*.json"))
    assert _processes_in(ws) == []


def test_next_run_ends_a_recorded_group_whose_owner_is_gone(tmp_path: Path) -> None:
    """The safety net behind the parent-death signal: a recorded group outliving its run is ended."""
    ws = tmp_path / "ws"
    ws.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=ws, start_new_session=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        record_group(ws, orphan.pid, "prefect-server")
        path = groups_dir(ws) / f"{orphan.pid}.json"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "owner_pid": gone.pid}))  # as if a killed run had written it
        mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=ws, start_new_session=True)
        record_group(ws, mine.pid, "dvc-worker")  # owned by this live process: not stale
        assert kill_stale_groups(ws) == [f"prefect-server group {orphan.pid}"]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert mine.poll() is None and [p.name for p in groups_dir(ws).iterdir()] == [f"{mine.pid}.json"]
    finally:
        for proc in (orphan, locals().get("mine")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(420)
def test_second_run_on_a_busy_workspace_refuses_or_waits(spine_workspace: Path, tmp_path: Path) -> None:
    ws = copy_workspace(spine_workspace, tmp_path / "ws")
    lock_before = _lock_stages(ws)
    log = tmp_path / "first.log"
    first = _start_run(ws, "--until", "annotate", "--force", log=log)
    try:
        # Hold the first run inside its first stage (frozen) while the others try: no race with its end.
        stopped = _wait(lambda: _stop_when_started("cogalign_core.stage", ws), 200, "the first run's first stage",
                        first, log)
        refused = _cli("run", "--workspace", str(ws), "--until", "annotate")
        assert refused.returncode == 2
        assert "another cogalign command" in refused.stderr and "--wait" in refused.stderr
        assert f"pid {first.pid} running `cogalign run" in refused.stderr  # names the holder
        with open(tmp_path / "waited.log", "wb") as fh:
            waiting = subprocess.Popen([COGALIGN, "run", "--workspace", str(ws), "--until", "annotate", "--wait"],
                                       env=cli_env(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        try:
            assert waiting.wait(timeout=300) == 0, (tmp_path / "waited.log").read_text()
        except subprocess.TimeoutExpired:
            waiting.kill()
            pytest.fail(f"--wait run still waiting after 300 s\n{(tmp_path / 'waited.log').read_text()[-2000:]}\n"
                        f"first run:\n{log.read_text()[-3000:]}")
        # --wait returns only after the first run released the lock, and then finds everything done.
        assert first.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "up to date" in (tmp_path / "waited.log").read_text()
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
    assert _task_run_counts(log_path.parent.name) == {"annotate": 1}  # a permanent error is not retried
    assert _processes_in(ws) == [] and not list(groups_dir(ws).glob("*.json"))
    # The table of what every selected stage did comes before the error.
    assert "annotate" in out.stdout and "failed" in out.stdout


def _task_run_counts(flow_run_id: str) -> dict[str, int]:
    """How many times each task of a flow run was attempted (from the session's Prefect server)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return {run.name: run.run_count for run in runs}


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
