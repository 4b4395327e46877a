"""The ``cogalign`` command line (typer + rich). Heavy imports (Prefect, DVC) happen inside commands.

Over 400 lines on purpose: one typer app is the whole command surface; each command only parses its options, calls one
function of ``cogalign``/``cogalign_core`` and prints the result, so splitting it would scatter the
``--help`` an operator reads in one place.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


class _App(typer.Typer):
    """The command line; an operating-system error (read-only or full disk, permissions) that no
    command anticipated still ends with one line saying what and where, never a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except OSError as exc:
            from cogalign.workspace import os_error_text

            Console(stderr=True).print(f"[bold red]error:[/] {escape(os_error_text(exc))}", soft_wrap=True)
            sys.exit(2)


app = _App(help="CogAlign pipeline: ingest -> annotate -> masks -> counterfactual -> SFT -> RL -> evaluate.",
           no_args_is_help=True, pretty_exceptions_show_locals=False)
review_app = typer.Typer(help="Clinician review round trip for masks and prompts.", no_args_is_help=True)
app.add_typer(review_app, name="review")
console = Console()
err = Console(stderr=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace directory.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="Wait for another command holding the workspace lock instead of refusing (exit 2).")]


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # unwrapped: log paths stay copyable
    raise typer.Exit(2)


@app.command()
def version() -> None:
    """Print the package version."""
    from cogalign_core import __version__

    console.print(__version__)


@app.command()
def init(path: Annotated[Path, typer.Argument(help="New workspace directory.")],
         sample: Annotated[bool, typer.Option("--sample", help="Register the bundled sample as batch one.")] = False,
         remote: Annotated[str | None, typer.Option(help="DVC remote (default: <path>/.dvcstore).")] = None,
         recipe: Annotated[str | None, typer.Option(
             help="Recipe family (model.recipe): lite0-small (default, a model that sees), tiny (seconds, blind), "
             "or a real one (qwen3-vl-2b, qwen3-vl-8b, qwen2.5-vl-3b).")] = None) -> None:
    """Scaffold a pipeline workspace (git, DVC, dvc.yaml, params.yaml, prefect.yaml)."""
    from cogalign.workspace import WorkspaceError, init_workspace

    try:
        ws = init_workspace(path, sample=sample, remote=remote, recipe=recipe)
    except WorkspaceError as exc:
        _fail(exc)
    console.print(f"initialised workspace [bold]{ws.root}[/] with batches {ws.params.batches or '[]'}")


@app.command()
def ingest(source: Annotated[Path | None, typer.Argument(help="Folder of raw endoscopy images.")] = None,
           workspace: WorkspaceOpt = Path("."),
           layout: Annotated[str, typer.Option(help="auto | seg | classes | manifest | collection")] = "auto",
           role: Annotated[str, typer.Option(help="train | test (test batches are never trained on)")] = "train",
           dataset: Annotated[str | None, typer.Option(help="Dataset id (default: from the folder name).")] = None,
           diagnosis: Annotated[str | None, typer.Option(
               help="Diagnosis of every image in the batch (a taxonomy term, e.g. polyp or normal); needed when "
               "the dataset is not one the taxonomy knows.")] = None,
           location: Annotated[str | None, typer.Option(help="Anatomical location term (e.g. colon, cecum).")] = None,
           morphology: Annotated[str | None, typer.Option(help="Morphology term (e.g. 'paris 0-is').")] = None,
           microvascular: Annotated[str | None, typer.Option(help="Microvascular term (e.g. 'nice 2').")] = None,
           remove: Annotated[str | None, typer.Option(
               "--remove", help="Withdraw this registered batch (e.g. b0002) instead of registering one.")] = None,
           wait: WaitOpt = False) -> None:
    """Register SOURCE as a new raw batch (DVC-tracked, never pushed unless configured), or withdraw one.

    Labels given here apply to every image of the batch (a manifest's diagnosis/location/morphology/
    microvascular columns give them per image and win); they are checked against the taxonomy now.
    """
    from cogalign.workspace import Workspace, WorkspaceError, register, withdraw

    if (source is None) == (remove is None):
        _fail(ValueError("give either SOURCE (register a batch) or --remove BATCH (withdraw one)"))
    labels = {"diagnosis": diagnosis, "location": location, "morphology": morphology, "microvascular": microvascular}
    try:
        ws = Workspace.open(workspace)
        if remove is not None:
            withdraw(ws, remove, wait=wait)
            console.print(f"withdrew raw batch [bold]{remove}[/]; `cogalign run` rebuilds what it fed")
            return
        batch = register(ws, source, layout=layout, role=role, dataset=dataset, labels=labels, wait=wait)
    except WorkspaceError as exc:
        _fail(exc)
    console.print(f"registered raw batch [bold]{batch}[/] ({role}); `cogalign run` processes it")


def _parse_overrides(values: list[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise typer.BadParameter(f"-S expects key=value, got {v!r}")
        k, val = v.split("=", 1)
        out[k.strip()] = val
    return out


@app.command()
def run(workspace: WorkspaceOpt = Path("."),
        until: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
        from_stage: Annotated[str | None, typer.Option("--from", help="Rerun this stage and everything after.")] = None,
        force: Annotated[bool, typer.Option(help="Rerun even if up to date.")] = False,
        no_commit: Annotated[bool, typer.Option("--no-commit", help="Do not record a git commit.")] = False,
        wait: WaitOpt = False,
        push: Annotated[bool, typer.Option(help="dvc push after a successful run (data/raw only if "
                                                "privacy.push_raw).")] = False,
        strict: Annotated[bool, typer.Option(help="Exit with an error when the run ends with a warning (a batch "
                                                  "with no usable sample, a stage dropping more than "
                                                  "drop_warning_fraction of its input).")] = False,
        set_: Annotated[list[str] | None, typer.Option("--set", "-S", help="Parameter override key.path=value.")] = None
        ) -> None:
    """Run the pipeline (only stale stages run) and commit dvc.lock, params and metrics.

    While stages run, each shows its progress (steps or items done, loss or reward, ETA): a live panel
    on a terminal, plain lines every COGALIGN_PROGRESS_INTERVAL seconds (default 10) otherwise.
    """
    from cogalign.processes import StageFailed
    from cogalign.runner import run_pipeline
    from cogalign.workspace import WorkspaceError

    try:
        with _progress_display():
            outcome = run_pipeline(workspace, until=until, from_stage=from_stage, force=force, commit=not no_commit,
                                   wait=wait, overrides=_parse_overrides(set_), push=push)
    except StageFailed as exc:
        if getattr(exc, "stages", None):
            print_run_summary(exc.stages)  # type: ignore[attr-defined]
        _fail(exc)
    except WorkspaceError as exc:
        _fail(exc)
    if outcome.cleaned:
        console.print(f"cleaned after an interrupted run: {', '.join(outcome.cleaned)}")
    if outcome.up_to_date:
        console.print("[green]up to date[/]: nothing changed since the last run")
    else:
        print_run_summary(outcome.stages)
        for line in outcome.report.lines:
            console.print(line, soft_wrap=True, highlight=False)
        console.print(f"flow run [bold]{outcome.flow_run_id}[/] finished in {outcome.seconds:.0f}s; "
                      f"revision {outcome.revision or '(no commit)'}")
    for warning in outcome.report.warnings:
        err.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    if strict and outcome.report.warnings:
        _fail(RuntimeError(f"--strict: the run ended with {len(outcome.report.warnings)} warning(s)"))


@contextlib.contextmanager
def _progress_display() -> Iterator[None]:
    """Show running stages' progress: a rich live panel on a terminal, plain lines on a pipe or in CI."""
    from cogalign.progress import BOARD, PlainDisplay, RichDisplay

    if console.is_terminal:
        with RichDisplay(console) as display, BOARD.attached(display):
            yield
    else:
        with BOARD.attached(PlainDisplay(sys.stdout)):
            yield


def print_run_summary(stages: list[dict[str, object]]) -> None:
    """The end-of-run table: one row per stage (status, seconds, device)."""
    table = Table("stage", "status", "seconds", "device")
    for s in stages:
        seconds = s.get("seconds")
        table.add_row(str(s["stage"]), str(s.get("status") or ("ran" if s.get("ran") else "up to date")),
                      f"{seconds:.1f}" if isinstance(seconds, int | float) else "-", str(s.get("devices", "-")))
    console.print(table)


@app.command()
def serve(workspace: WorkspaceOpt = Path("."),
          deployment: Annotated[list[str] | None, typer.Option(
              "--deployment", "-d", help="Serve only this prefect.yaml deployment (repeatable).")] = None,
          drop_folder: Annotated[Path | None, typer.Option(
              help="Drop folder for the retrain deployment (default: <workspace>/drop).")] = None) -> None:
    """Serve the workspace's prefect.yaml deployments against PREFECT_API_URL until interrupted."""
    from cogalign.serve import serve_workspace
    from cogalign.workspace import WorkspaceError

    try:
        serve_workspace(workspace, names=deployment, drop_folder=drop_folder)
    except WorkspaceError as exc:
        _fail(exc)


@app.command()
def status(workspace: WorkspaceOpt = Path(".")) -> None:
    """Show which stages are stale and why (DVC's view, after refreshing code fingerprints), and any
    cache object that no longer matches dvc.lock (exit 1)."""
    from cogalign.integrity import verify
    from cogalign.workspace import Workspace, WorkspaceError

    try:
        ws = Workspace.open(workspace)
        changed_code = ws.update_fingerprints()
        out = json.loads(ws.dvc("status", "--json").stdout or "{}")
        integrity = verify(ws)
    except WorkspaceError as exc:
        _fail(exc)
    if changed_code:
        console.print(f"code changed for: {', '.join(changed_code)}")
    if out:
        table = Table("stage", "why")
        for stage, changes in out.items():
            reasons = []
            for change in changes:
                if isinstance(change, dict):
                    for kind, detail in change.items():
                        reasons.append(f"{kind}: {json.dumps(detail)}")
                else:
                    reasons.append(str(change))
            table.add_row(stage, "\n".join(reasons))
        console.print(table)
    if integrity.corrupt:
        err.print(f"[bold red]error:[/] {len(integrity.corrupt)} corrupted cache object(s):\n"
                  + escape(integrity.summary(integrity.corrupt)), soft_wrap=True)
        raise typer.Exit(1)
    if not out:
        console.print("[green]up to date[/]")


@app.command()
def verify(workspace: WorkspaceOpt = Path("."),
           full: Annotated[bool, typer.Option(
               "--full", help="Re-hash every cache object and workspace copy (finds silent bit rot too).")] = False,
           repair: Annotated[bool, typer.Option(
               "--repair", help="Remove corrupted cache objects and the workspace copies made from them, so the "
               "next run rebuilds them.")] = False,
           wait: WaitOpt = False) -> None:
    """Re-hash the workspace's DVC data against dvc.lock; exit 1 naming every file that does not match."""
    import contextlib

    from cogalign.integrity import repair as repair_objects
    from cogalign.integrity import verify as verify_workspace
    from cogalign.workspace import Workspace, WorkspaceError, workspace_lock

    try:
        ws = Workspace.open(workspace)
        with workspace_lock(ws, wait=wait) if repair else contextlib.nullcontext():
            report = verify_workspace(ws, full=full)
            removed = repair_objects(ws, report) if repair else []
    except WorkspaceError as exc:
        _fail(exc)
    console.print(f"checked {report.objects} cache objects ({report.objects_hashed} re-hashed)"
                  + (f" and {report.workspace_files} workspace files" if full else "")
                  + f" in {report.seconds:.1f}s")
    if removed:
        console.print(f"removed {len(removed)} corrupted file(s): {', '.join(removed)}; `cogalign run` rebuilds "
                      "stage outputs")
    if not report.ok:
        err.print(f"[bold red]error:[/] {len(report.problems)} problem(s):\n" + escape(report.summary(limit=1000)),
                  soft_wrap=True)
        raise typer.Exit(1)
    console.print("[green]ok[/]: every tracked file matches dvc.lock")


@app.command()
def lineage(target: Annotated[str, typer.Argument(help="Artifact path, model directory or sample_id.")],
            workspace: Annotated[Path | None, typer.Option(
                "--workspace", "-w", help="Workspace directory (default: the one holding TARGET, or the current "
                "directory's).")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
            mermaid: Annotated[bool, typer.Option("--mermaid", help="Print a Mermaid flowchart.")] = False) -> None:
    """Which raw images, params and code made TARGET (or what a sample became)."""
    from cogalign import lineage as lin
    from cogalign.workspace import Workspace, WorkspaceError

    try:
        if workspace is not None:
            ws = Workspace.open(workspace)
        elif Path(target).exists():  # a path inside a workspace names its workspace
            ws, target = Workspace.find(target), str(Path(target).resolve())
        else:
            ws = Workspace.find(Path.cwd())
        record = lin.lineage(ws, target)
    except WorkspaceError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(record, indent=2, sort_keys=True, default=str))
    elif mermaid:
        typer.echo(lin.to_mermaid(record))
    else:
        _print_lineage(record)


@app.command()
def quarantine(workspace: WorkspaceOpt = Path("."),
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List quarantined files with their real paths (resolved locally from the raw zone; tables hold hashes)."""
    from cogalign.quarantine import quarantined
    from cogalign.workspace import Workspace, WorkspaceError

    try:
        rows = quarantined(Workspace.open(workspace))
    except WorkspaceError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table("batch", "path (local, patient-data zone)", "kind", "reason", "detail")
    for r in rows:
        table.add_row(r["batch_id"], r["path"] or f"<not in the raw zone: {r['name_hash']}>", r["kind"], r["reason"],
                      r["detail"] or "")
    console.print(table)
    console.print(f"{len(rows)} quarantined")


def _print_lineage(record: dict[str, object]) -> None:
    console.print(f"[bold]{record['target']}[/] ({record['kind']})  revision {record.get('revision')}  "
                  f"flow run {record.get('flow_run_id')}")
    if record["kind"] == "artifact":
        table = Table("stage", "code", "outputs (md5)")
        for st in record["chain"]:  # type: ignore[union-attr]
            table.add_row(st["stage"], str(st["code"]["package_version"]) + " " + st["code"]["sources_sha256"][:10],
                          "\n".join(f"{o['path']} {str(o['md5'])[:12]}" for o in st["outs"]))
        console.print(table)
        console.print(f"raw batches: {', '.join(record['raw_batches']) or '-'}")  # type: ignore[arg-type]
        for split, files in (record.get("raw_files") or {}).items():  # type: ignore[union-attr]
            console.print(f"{split}: {len(files)} raw files (use --json for the list)")
    else:
        console.print_json(json.dumps(record, default=str))


@app.command()
def compare(rev_a: Annotated[str, typer.Argument(help="Older workspace revision (git).")],
            rev_b: Annotated[str, typer.Argument(help="Newer workspace revision (git).")],
            workspace: WorkspaceOpt = Path(".")) -> None:
    """Metric deltas between two runs with 95% intervals; flags differences outside the noise."""
    from cogalign.compare import compare_metrics, read_metrics_at
    from cogalign.workspace import Workspace

    ws = Workspace.open(workspace)
    try:
        rows = compare_metrics(read_metrics_at(str(ws.root), rev_a), read_metrics_at(str(ws.root), rev_b))
    except Exception as exc:  # dvc raises many types for a missing file/revision
        _fail(RuntimeError(f"could not read metrics at {rev_a} / {rev_b}: {exc}"))
    table = Table("metric", rev_a[:10], rev_b[:10], "delta", "verdict")

    def fmt(v: float | None, ci: tuple[float | None, float | None]) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else "")

    for r in rows:
        verdict = "[bold yellow]outside noise[/]" if r.outside_noise else "within noise"
        table.add_row(r.key, fmt(r.old, r.old_ci), fmt(r.new, r.new_ci),
                      "-" if r.delta is None else f"{r.delta:+.3f}", verdict)
    console.print(table)


@review_app.command("export")
def review_export(out: Annotated[Path, typer.Argument(help="Task file to write (.csv or .json).")],
                  workspace: WorkspaceOpt = Path(".")) -> None:
    """Write the images that need a prompt or failed mask QC as a clinician task file."""
    from cogalign.workspace import Workspace
    from cogalign_core import review

    n = review.export_review(Workspace.open(workspace).root, out)
    console.print(f"wrote {n} review tasks to {out}")


@review_app.command("import")
def review_import(file: Annotated[Path, typer.Argument(help="Completed task file (.csv or .json).")],
                  workspace: WorkspaceOpt = Path("."), wait: WaitOpt = False) -> None:
    """Bring back clinician boxes/points/masks; the next run reruns only those samples."""
    from cogalign.workspace import Workspace, WorkspaceError, workspace_lock
    from cogalign_core import contract, review

    try:
        ws = Workspace.open(workspace)
        with workspace_lock(ws, wait=wait):
            n = review.import_review(ws.root, file)
            ws.commit(f"review import: {n} clinician prompts", [contract.REVIEW])
    except WorkspaceError as exc:
        _fail(exc)
    console.print(f"imported {n} clinician prompts; `cogalign run` picks them up")


@app.command()
def retrain(drop: Annotated[Path, typer.Option("--drop", help="Drop folder where new clinical images land.")],
            workspace: WorkspaceOpt = Path("."),
            until: Annotated[str | None, typer.Option(help="Stop the pipeline after this stage (no decision).")] = None
            ) -> None:
    """Take new files from the drop folder, rerun what changed, promote the challenger only if better."""
    from cogalign.processes import StageFailed
    from cogalign.runner import prefect_api
    from cogalign.workspace import Workspace, WorkspaceError

    try:
        ws = Workspace.open(workspace)
        with prefect_api(ws):
            from cogalign.flows.retrain import retrain as retrain_flow

            try:
                out = retrain_flow(str(ws.root), str(drop.resolve()), until=until)
            except StageFailed as exc:
                _fail(exc)
    except WorkspaceError as exc:
        _fail(exc)
    if out["noop"]:
        console.print(f"[green]no-op[/]: {out['note']} ({out['seconds']:.1f}s)")
        return
    console.print(f"drop folder: {json.dumps(out['drop'])}")
    console.print(f"new raw batch: {out['batch'] or '-'}; new batch ingest: {json.dumps(out['new_batch_ingest'])}")
    console.print(f"stages run: {', '.join(out['ran_stages']) or 'none'}")
    decision = out.get("decision")
    if decision is None:
        console.print(out["note"])
        return
    verdict = "[bold green]PROMOTED[/]" if decision["promote"] else "[bold yellow]not promoted[/]"
    console.print(f"decision {decision['id']}: {verdict} ({out['decision_path']})")
    for reason in decision["reasons"]:
        console.print(f"  - {reason}")


@app.command()
def forget(sample_id: Annotated[str | None, typer.Argument(help="Sample id to remove (`cogalign lineage`).")] = None,
           patient: Annotated[str | None, typer.Option(help="Remove every sample of this patient/sequence id.")] = None,
           workspace: WorkspaceOpt = Path("."),
           no_rerun: Annotated[bool, typer.Option("--no-rerun", help="Do not rerun the pipeline now.")] = False,
           wait: WaitOpt = False) -> None:
    """Remove a sample (or a patient's samples) and everything derived from it; collect the DVC cache."""
    from cogalign.forget import forget as forget_samples
    from cogalign.processes import StageFailed
    from cogalign.runner import prepare_prefect_env
    from cogalign.workspace import Workspace, WorkspaceError

    try:
        prepare_prefect_env(Workspace.open(workspace))
        out = forget_samples(workspace, sample_id=sample_id, patient=patient, rerun=not no_rerun, wait=wait)
    except (WorkspaceError, StageFailed) as exc:
        _fail(exc)
    console.print(f"forgot {out.samples} sample(s): {out.raw_files} raw file(s), {out.derived_images} derived "
                  f"image(s), {out.clinician_rows} clinician row(s); {out.cache_objects_removed} cache objects "
                  f"collected; reran: {', '.join(out.reran) or 'nothing'}")


@app.command()
def evaluate(workspace: WorkspaceOpt = Path("."),
             test_source: Annotated[Path | None, typer.Option(
                 "--test-source", help="Folder the workspace has never seen: registered as a test-role batch, "
                 "validated like any other, never trained on, reported in its own section.")] = None,
             layout: Annotated[str, typer.Option(help="Layout of --test-source.")] = "auto",
             no_commit: Annotated[bool, typer.Option("--no-commit", help="Do not record a git commit.")] = False,
             wait: WaitOpt = False) -> None:
    """Evaluate the trained models (optionally on a new external test folder) and refresh the report."""
    from cogalign.processes import StageFailed
    from cogalign.runner import run_pipeline
    from cogalign.workspace import Workspace, WorkspaceError, register, workspace_lock
    from cogalign_core import contract
    from cogalign_core.train.recipe import ARM_METHODS

    try:
        ws = Workspace.open(workspace)
        with workspace_lock(ws, wait=wait):  # the new batch and the run that evaluates it, as one
            if test_source is not None:
                batch = register(ws, test_source, layout=layout, role="test")
                console.print(f"registered {test_source} as external test batch [bold]{batch}[/]")
            outcome = run_pipeline(ws.root, until="evaluate", commit=not no_commit)
    except (WorkspaceError, StageFailed) as exc:
        _fail(exc)
    report = ws.root / contract.REPORT
    training = ("base_model", *ARM_METHODS)
    retrained = [s["stage"] for s in outcome.stages if s["ran"] and s["stage"] in training]
    console.print(f"report: {report}" + (f"  (retrained: {', '.join(retrained)})" if retrained else ""))


@app.command()
def study(workspace: WorkspaceOpt = Path("."),
          seeds: Annotated[int, typer.Option(help="Seeds per condition (model.seed = 0 .. N-1).")] = 3,
          name: Annotated[str | None, typer.Option(help="Study name (default: study-<date>-<time>).")] = None,
          cross_source: Annotated[list[str] | None, typer.Option(
              "--cross-source", help="Add a condition with this source dataset held out of training (e.g. "
              "kvasir-seg); its test rows are the cross-source result. Repeatable.")] = None,
          set_: Annotated[list[str] | None, typer.Option(
              "--set", "-S", help="Parameter override for every experiment, key.path=value (e.g. "
              "model.rl_max_steps=200); recorded in the table.")] = None,
          dry_run: Annotated[bool, typer.Option(
              help="Check the request and print the experiments it would run (name, -S overrides); run nothing.")
          ] = False,
          wait: WaitOpt = False) -> None:
    """Train every arm for N seeds as recorded DVC experiments and write one table (studies/<name>/).

    Experiments run one after another; the same command with the same --name resumes an interrupted study.
    """
    from cogalign.processes import StageFailed
    from cogalign.runner import prepare_prefect_env
    from cogalign.study import check_request, conditions, planned, run_study
    from cogalign.workspace import Workspace, WorkspaceError

    try:
        ws = Workspace.open(workspace)
        _parse_overrides(set_)  # the same key=value check as `cogalign run -S`
        check_request(seeds, set_ or [])
        if dry_run:
            for _, _, exp, exp_overrides in planned(name or "<name>", conditions(cross_source or []),
                                                    list(range(seeds)), set_ or []):
                console.print(f"{exp}: dvc exp run --temp -n {exp} " + " ".join(f"-S {o}" for o in exp_overrides),
                              soft_wrap=True, highlight=False, markup=False)
            return
        prepare_prefect_env(ws)
        out = run_study(workspace, seeds, name, cross_source or [], overrides=set_ or [], wait=wait)
    except (WorkspaceError, StageFailed) as exc:
        _fail(exc)
    console.print((out / "study.md").read_text())
    console.print(f"study table: {out / 'study.md'} (and study.json); experiments: `dvc exp show` in {workspace}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
