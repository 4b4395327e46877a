"""Pipeline workspaces: a git + DVC repository holding one pipeline's data, params and history.

``init`` scaffolds one; ``register`` adds a raw batch and ``withdraw`` takes one back; fingerprints,
git commits and DVC calls used by ``cogalign run`` live here too. DVC and git run as child processes
of the current interpreter's environment, so the stage commands (``python -m cogalign_core.stage``)
resolve to this install.

Every command that changes a workspace (batch ids, ``params.yaml``, git commits, outputs) does so
inside :func:`workspace_lock`: one kernel lock per workspace, held by one process at a time.

Over 400 lines on purpose: the lock and the all-or-nothing registration/withdrawal must share the
workspace's git and DVC helpers; splitting them would spread one invariant (only the lock holder
changes a workspace) over several modules.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cogalign_core import contract, raw_batch, review
from cogalign_core.annotate import CLINICIAN_CSV_HEADER
from cogalign_core.config import PARAMS_FILE, PipelineParams, dump_params, load_params
from cogalign_core.io import atomic_write_bytes, atomic_write_text
from cogalign_core.stage import STAGES, fingerprint_text

TEMPLATE_FILES = ("dvc.yaml", "prefect.yaml")
STATE_DIR = Path(contract.STATE)
RUNS_DIR = STATE_DIR / "runs"
LOCK_FILE = STATE_DIR / "workspace.lock"
REMOTE_DIR = Path(".dvcstore")
GITIGNORE = """\
# cogalign run state (run ids, Prefect home, locks) and execution settings: kept outside versioned outputs
/.cogalign/
# local DVC remote of the demo
/.dvcstore/
"""


class WorkspaceError(RuntimeError):
    """A workspace operation that cannot proceed, with a message meant for the operator."""


class WorkspaceBusy(WorkspaceError):
    """Another process holds the workspace lock (the message names its pid and command)."""


def os_error_text(exc: OSError) -> str:
    """One line for an operating-system error: what failed, the error name, and where.

    E.g. ``No space left on device [ENOSPC]: /ws/data/raw/b0002/batch.json``.
    """
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    what = exc.strerror or str(exc)
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{what}{f' [{name}]' if name else ''}{f': {where}' if where else ''}"


@dataclass(frozen=True)
class Workspace:
    """A pipeline workspace directory."""

    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Workspace:
        root = Path(path).resolve()
        if not (root / "dvc.yaml").exists() or not (root / ".dvc").is_dir():
            raise WorkspaceError(f"{root} is not a cogalign workspace (no dvc.yaml/.dvc): run `cogalign init {path}`")
        return cls(root)

    @classmethod
    def find(cls, path: str | os.PathLike[str]) -> Workspace:
        """The workspace holding ``path``: the nearest folder at or above it with dvc.yaml and .dvc/."""
        start = Path(path).resolve()
        for candidate in (start, *start.parents):
            if (candidate / "dvc.yaml").exists() and (candidate / ".dvc").is_dir():
                return cls(candidate)
        raise WorkspaceError(f"{path} is not inside a cogalign workspace (no dvc.yaml/.dvc above it): "
                             "pass --workspace")

    @property
    def params(self) -> PipelineParams:
        return load_params(self.root)

    def write_params(self, params: PipelineParams) -> None:
        atomic_write_text(self.root / PARAMS_FILE, dump_params(params))

    # ------------------------------------------------------------------ child processes
    def env(self) -> dict[str, str]:
        """Environment for DVC/stage children: this interpreter's bin dir first on PATH."""
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("DVC_NO_ANALYTICS", "1")
        env["COGALIGN_WORKSPACE"] = str(self.root)
        return env

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["git", *args], self.root, self.env(), check)

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-m", "dvc", *args], self.root, self.env(), check)

    # ------------------------------------------------------------------ fingerprints
    def update_fingerprints(self) -> list[str]:
        """Rewrite ``code/<stage>.json`` where the installed code differs; return changed stages."""
        changed = []
        recipe = self.params.model.recipe
        for stage in STAGES:
            path = self.root / contract.fingerprint(stage)
            text = fingerprint_text(stage, recipe)
            if not path.exists() or path.read_text() != text:
                atomic_write_text(path, text)
                changed.append(stage)
        return changed

    # ------------------------------------------------------------------ git
    def commit(self, message: str, paths: list[str] | None = None) -> str | None:
        """Commit ``paths`` (default: pipeline metadata) if anything changed; return the new revision."""
        default = ["dvc.yaml", "dvc.lock", PARAMS_FILE, "prefect.yaml", contract.CODE,
                   Path(contract.CLINICIAN_LABELS).parent.as_posix(), ".gitignore", contract.DATA, ".dvc/config",
                   ".dvcignore"]
        existing = [p for p in (paths or default) if (self.root / p).exists()]
        self.git("add", "--", *existing)
        if self.git("diff", "--cached", "--quiet", check=False).returncode == 0:
            return None
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def lock_stages(self) -> dict[str, Any]:
        """``dvc.lock``'s stage entries (empty before the first run)."""
        path = self.root / "dvc.lock"
        return (yaml.safe_load(path.read_text()) or {}).get("stages") or {} if path.exists() else {}

    def revision(self) -> str | None:
        out = self.git("rev-parse", "HEAD", check=False)
        return out.stdout.strip() if out.returncode == 0 else None


class CommandFailed(WorkspaceError):
    """A git or DVC child process failed; the message carries its first error line, ``output`` all of it."""

    def __init__(self, cmd: list[str], cwd: Path, returncode: int, output: str) -> None:
        self.cmd, self.returncode, self.output = cmd, returncode, output
        shown = ["dvc", *cmd[3:]] if cmd[:3] == [sys.executable, "-m", "dvc"] else cmd
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
        cause = errors[0] if errors else (lines[-1] if lines else "no output")
        more = f" (+{len(errors) - 1} more errors; run it in {cwd} to see them)" if len(errors) > 1 else ""
        super().__init__(f"`{shlex.join(shown)}` failed in {cwd} (exit {returncode}): {cause}{more}")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise CommandFailed(cmd, cwd, proc.returncode, proc.stderr.strip() or proc.stdout.strip())
    return proc


# ---------------------------------------------------------------------------- the workspace lock
_held: dict[Path, int] = {}  # workspace root -> nesting depth in this process
_held_guard = threading.Lock()


def this_command() -> str:
    """This process's command line as an operator would type it (``cogalign ingest ...``)."""
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name or argv[0]
    return shlex.join(argv)


def lock_holder(ws: Workspace) -> dict[str, Any] | None:
    """The lock file's record of the last holder: ``{"pid", "command", "since"}`` (None when empty)."""
    try:
        text = (ws.root / LOCK_FILE).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} running `{holder.get('command')}` since {since}"


@contextlib.contextmanager
def workspace_lock(ws: Workspace, wait: bool = False) -> Iterator[None]:
    """Hold the workspace's exclusive lock: the one guard of every mutation (ingest, run, retrain,
    review import, forget, study, ``-S`` overrides).

    A kernel ``flock`` on ``.cogalign/workspace.lock``, released by the kernel when the holder dies
    (no stale locks); the file records the holder's pid, command line and start time so a refusal
    can name them. Re-entrant within one process, so a command made of several locked steps
    (retrain = register + run + decide) holds it throughout.

    Args:
        wait: block until the holder finishes (printing once whom it waits for) instead of
            raising :class:`WorkspaceBusy`.
    """
    root = ws.root
    with _held_guard:
        depth = _held.get(root, 0)
        if depth:
            _held[root] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held[root] -= 1
        return
    path = root / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WorkspaceError(f"cannot open the workspace lock {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(lock_holder(ws))
            if not wait:
                raise WorkspaceBusy(f"another cogalign command is working on {root}: {holder}; wait for it to "
                                    "finish or pass --wait") from None
            print(f"waiting for the workspace lock of {root} ({holder})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = json.dumps({"pid": os.getpid(), "command": this_command(), "since": round(time.time(), 3)})
        with contextlib.suppress(OSError):  # the record is informative; a full disk must not block the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode() + b"\n", 0)
        with _held_guard:
            _held[root] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(root, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def template_text(name: str) -> str:
    """Text of a packaged workspace template (dvc.yaml, prefect.yaml)."""
    return resources.files("cogalign").joinpath("templates", name).read_text()


def sample_data_path() -> Path:
    """Directory of the bundled real sample (works for editable and regular installs)."""
    return Path(str(resources.files("cogalign_core.sample_data")))


def init_workspace(path: str | os.PathLike[str], sample: bool = False, salt: str | None = None,
                   remote: str | None = None, recipe: str | None = None) -> Workspace:
    """Scaffold a workspace: git, DVC (analytics off, link-type cache, local remote), templates, params.

    Args:
        path: new or empty directory.
        sample: register the bundled sample as the first raw batch.
        salt: pseudonymisation key (default: 32 random bytes, hex).
        remote: DVC remote URL/path (default: ``<path>/.dvcstore``).
        recipe: recipe family for ``model.recipe`` (default: the params default, lite0-small).
    """
    root = Path(path).resolve()
    if root.exists() and any(root.iterdir()):
        raise WorkspaceError(f"{root} exists and is not empty: choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    try:
        ws.git("init", "-q", "-b", "main")
        # Local identity so commits work on fresh machines without a global git config.
        if ws.git("config", "user.email", check=False).returncode != 0:
            ws.git("config", "user.email", "cogalign@localhost")
            ws.git("config", "user.name", "cogalign")
        ws.dvc("init", "-q")
        ws.dvc("config", "core.analytics", "false")
        # Link from the cache instead of copying, so images are not stored twice.
        ws.dvc("config", "cache.type", "reflink,hardlink,copy")
        remote_url = remote or str(root / REMOTE_DIR)
        ws.dvc("remote", "add", "-d", "local", remote_url)
        for name in TEMPLATE_FILES:
            atomic_write_text(root / name, template_text(name))
        params = PipelineParams()
        params.privacy.salt = salt or secrets.token_hex(32)
        if recipe is not None:
            from cogalign_core.train.recipe import families

            if recipe not in families():
                raise WorkspaceError(f"unknown recipe {recipe!r}; recipes: {', '.join(families())}")
            params.model.recipe = recipe
        ws.write_params(params)
        atomic_write_text(root / contract.CLINICIAN_LABELS, CLINICIAN_CSV_HEADER)
        review.ensure_prompts_file(root)  # clinician prompts: empty until the first review import
        atomic_write_text(root / ".gitignore", GITIGNORE)
        (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
        ws.update_fingerprints()
        ws.commit("cogalign init: workspace scaffold")
        if sample:
            register(ws, sample_data_path(), layout="auto", role="train", message="register bundled sample")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return ws


def register(ws: Workspace, source: str | os.PathLike[str], layout: str = "auto", role: str = "train",
             dataset: str | None = None, message: str | None = None,
             labels: dict[str, str | None] | None = None, wait: bool = False) -> str:
    """Add ``source`` as a new raw batch, all or nothing, under the workspace lock.

    The batch id is chosen, the copy made and verified (:func:`raw_batch.register_batch`), tracked
    with ``dvc add`` (never pushed), appended to ``params.yaml`` and committed while the lock is
    held, so concurrent ingests get distinct ids and none is lost from ``params.yaml``. When any
    step fails, everything it did is undone and the error says what failed; nothing is registered.
    ``labels`` apply to every image of the batch (checked against the taxonomy, kept in ``batch.json``).
    """
    src = Path(source).resolve()
    if not (src.is_dir() or (layout == "manifest" and src.is_file())):
        raise WorkspaceError(f"{source} is not a directory")
    if role not in ("train", "test"):
        raise WorkspaceError(f"--role must be train or test, not {role!r}")
    with workspace_lock(ws, wait=wait):
        raw_root = ws.root / contract.RAW
        batch_id = raw_batch.next_batch_id(raw_root)
        failed = f"registering {src} as batch {batch_id} failed, nothing was registered"
        try:
            raw_batch.register_batch(src, raw_root, batch_id, layout=layout, role=role, dataset=dataset,
                                     labels=labels)
        except ValueError as exc:
            raise WorkspaceError(str(exc)) from exc
        except raw_batch.CopyFailed as exc:
            raise WorkspaceError(f"{failed}: {exc}") from exc
        except OSError as exc:
            raise WorkspaceError(f"{failed}: {os_error_text(exc)}") from exc
        rel = contract.raw_batch(batch_id)
        touched = [PARAMS_FILE, f"{contract.RAW}/.gitignore"]
        before = {p: (ws.root / p).read_bytes() if (ws.root / p).exists() else None for p in touched}
        try:
            params = ws.params
            track_raw_batch(ws, batch_id, params.privacy.push_raw)
            params.batches.append(batch_id)
            ws.write_params(params)
            ws.commit(message or f"register raw batch {batch_id} ({role})", [f"{rel}.dvc", *touched])
        except BaseException as exc:
            _undo_registration(ws, batch_id, before)
            if isinstance(exc, OSError):
                raise WorkspaceError(f"{failed}: {os_error_text(exc)}") from exc
            if isinstance(exc, WorkspaceError):
                raise WorkspaceError(f"{failed}: {exc}") from exc
            raise
    return batch_id


def _undo_registration(ws: Workspace, batch_id: str, before: dict[str, bytes | None]) -> None:
    """Remove a half-registered batch: its copy, its ``.dvc`` file, and restore the touched files."""
    rel = contract.raw_batch(batch_id)
    with contextlib.suppress(OSError):
        shutil.rmtree(ws.root / rel, ignore_errors=True)
        (ws.root / f"{rel}.dvc").unlink(missing_ok=True)
    ws.git("reset", "-q", "--", f"{rel}.dvc", *before, check=False)
    for path, data in before.items():
        with contextlib.suppress(OSError):
            if data is None:
                (ws.root / path).unlink(missing_ok=True)
            else:
                atomic_write_bytes(ws.root / path, data)


def withdraw(ws: Workspace, batch_id: str, wait: bool = False) -> None:
    """Take a registered raw batch back (``cogalign ingest --remove``), under the workspace lock.

    Removes the batch from ``params.yaml``, its raw copy and ``.dvc`` file, its per-batch ingest
    output, and the drop-ledger entries that named it (so a retrain may take the corrected files
    again); leaves ``data/raw/<batch>.withdrawn`` so the id is never reused. Commits the change.
    The next ``cogalign run`` rebuilds what the batch fed. Cache objects stay until ``dvc gc``.
    """
    with workspace_lock(ws, wait=wait):
        params = ws.params
        raw_root = ws.root / contract.RAW
        dvc_file = raw_root / f"{batch_id}.dvc"
        if batch_id not in params.batches and not dvc_file.exists():
            raise WorkspaceError(f"{batch_id} is not a registered batch of {ws.root} "
                                 f"(batches: {', '.join(params.batches) or 'none'})")
        if dvc_file.exists():
            ws.dvc("remove", "--outs", dvc_file.relative_to(ws.root).as_posix())
        shutil.rmtree(raw_root / batch_id, ignore_errors=True)
        shutil.rmtree(ws.root / contract.ingest_batch(batch_id), ignore_errors=True)
        params.batches = [b for b in params.batches if b != batch_id]
        ws.write_params(params)
        atomic_write_text(raw_root / f"{batch_id}{raw_batch.WITHDRAWN_SUFFIX}",
                          f"batch {batch_id} withdrawn on {time.strftime('%Y-%m-%d')}: its id is not reused\n")
        from cogalign.retrain import LEDGER, read_ledger, write_ledger

        ledger = read_ledger(ws)
        kept = {digest: batch for digest, batch in ledger.items() if batch != batch_id}
        if kept != ledger:
            write_ledger(ws, kept)
        ws.commit(f"withdraw raw batch {batch_id}", [contract.RAW, PARAMS_FILE, str(LEDGER)])


def track_raw_batch(ws: Workspace, batch_id: str, push_allowed: bool) -> None:
    """``dvc add`` a raw batch, relinked from the cache, with its push flag set (patient-data zone)."""
    rel = contract.raw_batch(batch_id)
    # Not -q: DVC's error lines are what a failure message shows. `dvc add` exits 0 even when
    # objects failed to reach the cache (a full cache disk), so any ERROR line fails it here.
    added = ws.dvc("add", rel)
    if any(line.startswith("ERROR") for line in added.stderr.splitlines()):
        raise CommandFailed(added.args, ws.root, added.returncode, added.stderr)
    # `dvc add` leaves a copy in place; relink so the batch is stored once (cache.type links).
    ws.dvc("checkout", "--relink", f"{rel}.dvc")
    set_raw_push(ws.root / f"{rel}.dvc", push_allowed)


def set_raw_push(dvc_file: Path, allowed: bool) -> bool:
    """data/raw is the patient-data zone: its outputs carry ``push: false`` unless ``privacy.push_raw``.

    Returns True when the file changed.
    """
    doc = yaml.safe_load(dvc_file.read_text())
    changed = False
    for out in doc.get("outs", []):
        if allowed and "push" in out:
            del out["push"]
            changed = True
        elif not allowed and out.get("push") is not False:
            out["push"] = False
            changed = True
    if changed:
        atomic_write_text(dvc_file, yaml.safe_dump(doc, sort_keys=False))
    return changed


def push(ws: Workspace) -> str:
    """``dvc push`` the workspace's outputs; raw batches only when ``privacy.push_raw`` allows it."""
    allowed = ws.params.privacy.push_raw
    changed = [str(f.relative_to(ws.root)) for f in sorted((ws.root / contract.RAW).glob("*.dvc"))
               if set_raw_push(f, allowed)]
    if changed:
        ws.commit(f"raw zone push {'allowed' if allowed else 'disabled'} (privacy.push_raw)", changed)
    return ws.dvc("push").stdout.strip()
