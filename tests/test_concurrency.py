"""A workspace many hands touch: concurrent ingests, a run during an ingest, a full or read-only disk,
bad manifests refused at the door, withdrawing a batch, and temp files that belong to someone.

Every command is a real ``cogalign`` process on real files (bundled CVC-ClinicDB frames). Where a
disk must fill or a copy must be slow on any machine, the command runs through ``_SHIM``: the same
CLI with ``os.write`` wrapped for files under ``data/raw/`` (a delay, or ENOSPC after N writes),
which is where the operating system reports those conditions. With root, the same failures are
also produced by a real tiny tmpfs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cogalign.workspace import LOCK_FILE, Workspace, init_workspace, register
from cogalign_core.io import TMP_PREFIX, remove_stale_temps
from tests.conftest import COGALIGN

SALT = "concurrency-salt-" + "0" * 32
CVC = Path(__file__).resolve().parents[1] / "data" / "sample" / "cvc-clinicdb"

_SHIM = textwrap.dedent("""
    import errno, os, sys, time
    delay = float(os.environ.get("SHIM_RAW_WRITE_DELAY", "0"))
    fail_after = int(os.environ.get("SHIM_RAW_ENOSPC_AFTER", "-1"))
    real_write, writes = os.write, [0]
    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if "/data/raw/" in target:
            writes[0] += 1
            if 0 <= fail_after < writes[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            time.sleep(delay)
        return real_write(fd, data)
    os.write = write
    sys.argv[0] = "cogalign"
    from cogalign.cli import app
    app()
""")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PREFECT_LOGGING_LEVEL="WARNING",
               COLUMNS="1000", **extra)
    try:
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    except ImportError:
        pass
    return env


def _cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COGALIGN, *args], env=_env(**env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _shim(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _SHIM, *args], env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _seg_source(dest: Path, start: int, n: int = 6) -> Path:
    """A CVC-ClinicDB seg dataset of ``n`` real frames (images, masks, metadata rows)."""
    frames = sorted(p.stem for p in (CVC / "images").glob("*.jpg"))[start:start + n]
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for f in frames:
        shutil.copy2(CVC / "images" / f"{f}.jpg", dest / "images")
        shutil.copy2(CVC / "masks" / f"{f}.png", dest / "masks")
    rows = [line for line in (CVC / "metadata.csv").read_text().splitlines()[1:] if line.split(",")[0] in frames]
    (dest / "metadata.csv").write_text("\n".join(["frame,sequence", *rows]) + "\n")
    return dest


def _files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout.strip()


def _assert_nothing_registered(ws: Path, head: str) -> None:
    assert Workspace(ws).params.batches == []
    raw = ws / "data" / "raw"
    assert not raw.exists() or [p.name for p in raw.iterdir() if p.name != ".gitignore"] == []
    assert _git(ws, "rev-parse", "HEAD") == head and _git(ws, "status", "--porcelain") == ""


def _holder(ws: Path) -> dict[str, object] | None:
    try:
        return json.loads((ws / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture()
def empty_ws(tmp_path: Path) -> Path:
    return init_workspace(tmp_path / "ws", salt=SALT).root


@pytest.mark.timeout(300)
def test_concurrent_ingests_get_distinct_ids_and_all_reach_params(empty_ws: Path, tmp_path: Path) -> None:
    sources = [_seg_source(tmp_path / f"site{i}", start=6 * i) for i in range(3)]
    # Slow copies (0.2 s per file) so the three commands really overlap.
    procs = [_shim("ingest", str(src), "--workspace", str(empty_ws), "--wait", SHIM_RAW_WRITE_DELAY="0.2")
             for src in sources]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    ids = sorted(m for out, _ in outs for m in re.findall(r"registered raw batch (b\d{4})", out))
    assert ids == ["b0001", "b0002", "b0003"]
    assert Workspace(empty_ws).params.batches == ids
    assert any("waiting for the workspace lock" in err for _, err in outs)  # they did contend
    by_source = {}
    for batch in ids:
        record = json.loads((empty_ws / "data/raw" / batch / "batch.json").read_text())
        by_source[record["source_name"]] = batch
        assert record["entries"]["files"] == _files(empty_ws / "data/raw" / batch / "files") == 13
    assert sorted(by_source) == ["site0", "site1", "site2"]
    assert _git(empty_ws, "status", "--porcelain") == ""
    assert len(_git(empty_ws, "log", "--oneline", "--grep", "register raw batch").splitlines()) == 3


@pytest.mark.timeout(420)
def test_run_and_another_ingest_during_an_ingest_refuse_or_wait(prefect_harness: None, empty_ws: Path,
                                                                  tmp_path: Path) -> None:
    source = _seg_source(tmp_path / "site", start=0, n=8)
    ingest = _shim("ingest", str(source), "--workspace", str(empty_ws), SHIM_RAW_WRITE_DELAY="0.4")
    try:
        _wait(lambda: (_holder(empty_ws) or {}).get("pid") == ingest.pid, 60, "the ingest to hold the lock")
        _wait(lambda: list((empty_ws / "data/raw").glob(f"{TMP_PREFIX}*")), 30, "the ingest's copy to start")
        for args in (["ingest", str(_seg_source(tmp_path / "other", start=20))], ["run", "--until", "ingest"]):
            refused = _cli(*args, "--workspace", str(empty_ws))
            assert refused.returncode == 2, refused.stdout + refused.stderr
            (line,) = _error_lines(refused.stderr)
            assert f"pid {ingest.pid}" in line and "ingest" in line and "--wait" in line
        waited = _cli("run", "--workspace", str(empty_ws), "--until", "ingest", "--wait")
        # The run started only after the ingest finished and committed its batch whole.
        assert ingest.poll() == 0, ingest.communicate()
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "waiting for the workspace lock" in waited.stderr
    finally:
        if ingest.poll() is None:
            ingest.kill()
    assert Workspace(empty_ws).params.batches == ["b0001"]
    assert _files(empty_ws / "data/raw/b0001/files") == _files(source) == 17
    summary = json.loads((empty_ws / "data/ingest/batches/b0001/summary.json").read_text())
    assert summary["seen"] == summary["ingested"] == 8 and summary["with_mask"] == 8
    assert (empty_ws / "data/raw/b0001/files/metadata.csv").read_text() == (source / "metadata.csv").read_text()


def test_disk_full_during_the_ingest_copy_registers_nothing(empty_ws: Path, tmp_path: Path) -> None:
    head = _git(empty_ws, "rev-parse", "HEAD")
    source = _seg_source(tmp_path / "site", start=0)
    proc = _shim("ingest", str(source), "--workspace", str(empty_ws), SHIM_RAW_ENOSPC_AFTER="4")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    (line,) = _error_lines(err)
    assert line.startswith("error:") and "No space left on device" in line and "nothing was registered" in line
    _assert_nothing_registered(empty_ws, head)
    # Space again: the same source registers as the first batch.
    again = _cli("ingest", str(source), "--workspace", str(empty_ws))
    assert again.returncode == 0 and "b0001" in again.stdout, again.stderr


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and sys.platform.startswith("linux")


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root")
def test_disk_full_on_a_real_small_filesystem_registers_nothing(empty_ws: Path, tmp_path: Path) -> None:
    head = _git(empty_ws, "rev-parse", "HEAD")
    source = _seg_source(tmp_path / "site", start=0, n=30)  # about 1 MB
    for target, size in ((empty_ws / "data" / "raw", "256k"), (empty_ws / ".dvc" / "cache", "64k")):
        # The copy itself hits the full disk; then the copy fits but DVC's cache does not.
        target.mkdir(parents=True, exist_ok=True)
        if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)):
            pytest.skip("mount not permitted here")
        try:
            out = _cli("ingest", str(source), "--workspace", str(empty_ws))
            assert out.returncode == 2, out.stdout
            (line,) = _error_lines(out.stderr)
            assert "No space left on device" in line and "nothing was registered" in line, line
            _assert_nothing_registered(empty_ws, head)
        finally:
            subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("content", ["", "path,label\n", "image_id,label\nimages/200.jpg,polyp\n",
                                     "path,label\n\xe9t\xe9.jpg,polyp\n"],
                         ids=["empty", "header-only", "no-path-column", "not-utf8"])
def test_unusable_manifest_is_refused_at_ingest(empty_ws: Path, tmp_path: Path, content: str) -> None:
    head = _git(empty_ws, "rev-parse", "HEAD")
    src = tmp_path / "site"
    (src / "images").mkdir(parents=True)
    shutil.copy2(CVC / "images" / "200.jpg", src / "images")
    (src / "manifest.csv").write_bytes(content.encode("latin-1"))
    out = _cli("ingest", str(src), "--layout", "manifest", "--workspace", str(empty_ws))
    assert out.returncode == 2, out.stdout
    (line,) = _error_lines(out.stderr)
    assert "manifest.csv" in line and any(w in line for w in ("empty", "no row", "no path column", "UTF-8"))
    _assert_nothing_registered(empty_ws, head)


def test_a_registered_batch_can_be_withdrawn_and_its_id_is_never_reused(empty_ws: Path, tmp_path: Path) -> None:
    ws = Workspace(empty_ws)
    first = register(ws, _seg_source(tmp_path / "a", start=0))
    second = register(ws, _seg_source(tmp_path / "b", start=6))
    out = _cli("ingest", "--remove", first, "--workspace", str(empty_ws))
    assert out.returncode == 0, out.stderr
    assert ws.params.batches == [second]
    assert not (empty_ws / "data/raw" / first).exists() and not (empty_ws / "data/raw" / f"{first}.dvc").exists()
    assert _git(empty_ws, "status", "--porcelain") == ""
    assert register(ws, _seg_source(tmp_path / "c", start=12)) == "b0003"
    unknown = _cli("ingest", "--remove", "b0042", "--workspace", str(empty_ws))
    assert unknown.returncode == 2 and "b0042 is not a registered batch" in unknown.stderr


def _read_only(ws: Path, tmp_path: Path):
    """A read-only view of ``ws``: a read-only bind mount (root) or the tree made unwritable."""
    if _can_mount():
        view = tmp_path / "ro"
        view.mkdir()
        if _mount("--bind", str(ws), str(view)) and _mount("-o", "remount,ro,bind", str(view)):
            return view, "Read-only file system", lambda: subprocess.run(["umount", str(view)], check=True)
        subprocess.run(["umount", str(view)], capture_output=True)
    subprocess.run(["chmod", "-R", "a-w", str(ws)], check=True)
    return ws, "Permission denied", lambda: subprocess.run(["chmod", "-R", "u+w", str(ws)], check=True)


def test_read_only_workspace_gives_a_one_line_error(empty_ws: Path, tmp_path: Path) -> None:
    register(Workspace(empty_ws), _seg_source(tmp_path / "a", start=0))
    source = _seg_source(tmp_path / "b", start=6)
    view, reason, undo = _read_only(empty_ws, tmp_path)
    if reason == "Permission denied" and os.geteuid() == 0:
        undo()
        pytest.skip("root ignores permissions and cannot mount here")
    try:
        for args in (["ingest", str(source)], ["run", "--until", "ingest"], ["ingest", "--remove", "b0001"]):
            out = _cli(*args, "--workspace", str(view))
            assert out.returncode == 2, out.stdout + out.stderr
            (line,) = _error_lines(out.stderr)
            assert line.startswith("error:") and reason in line and str(view) in line, line
    finally:
        undo()


_TEMP_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cogalign_core.io import atomic_path
    with atomic_path(Path(sys.argv[1])) as tmp:
        tmp.write_bytes(b"in progress")
        print("writing", flush=True)
        time.sleep(60)
""")


def test_cleanup_removes_only_temps_whose_owner_is_dead(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", _TEMP_WRITER, str(tmp_path / "out.parquet")],
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        (temp,) = tmp_path.glob(f"{TMP_PREFIX}*")
        assert str(writer.pid) in temp.name
        assert remove_stale_temps(tmp_path) == [] and temp.exists()  # a live writer's temp is left alone
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        assert remove_stale_temps(tmp_path) == [temp] and not temp.exists()
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
