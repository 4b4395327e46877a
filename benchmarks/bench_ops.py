"""Operations benchmark: reruns of the data stages vs a full run, and the counterfactual stage on Dask.

    python benchmarks/bench_ops.py [--source ../shared/data] [--cf-images N]

1. Data stages (``ingest_batch`` .. ``counterfactual``) through ``run_pipeline(until="counterfactual")``
   on SOURCE (default: the full ``../shared/data``, ~1,170 real images; ``--source sample`` for the
   bundled sample) minus a held-out 10 % of its images, against one Prefect server started beforehand
   (its start-up is not a pipeline cost). Times, side by side in one run:
   - full run on a fresh workspace;
   - a no-op rerun (nothing changed: DVC skips every stage) — goal <= 0.05 of full;
   - a rerun after registering the held-out 10 % as a new batch — goal <= 0.25 of full;
   - a rerun after a clinician review import of 5 samples: its mask stage vs the full run's mask
     stage — goal <= 0.1.
   After each run the samples the incremental stages computed and reused are printed (counted, from
   ``.cogalign/reuse/``).
2. ``counterfactual.run_stage`` on a mask workspace of N accepted lesion images: one process
   (``COGALIGN_WORKERS=1``) vs a local Dask cluster of 2 workers (``COGALIGN_DASK_ADDRESS=local``,
   cluster start-up included, since a stage pays it). Outputs are checked byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.mask_workspace builds the counterfactual workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def split_source(source: Path, dst: Path, held_out: float = 0.10) -> tuple[Path, Path, int]:
    """Copy ``source`` (a collection of datasets) to ``dst/base`` minus every 10th image of each dataset,
    which goes with its mask to ``dst/new``, a collection of the same layout (metadata files copied).
    Returns (base, new, n held out)."""
    import shutil

    base, new = dst / "base", dst / "new"
    shutil.copytree(source, base, ignore=shutil.ignore_patterns("__*"))
    step = max(1, round(1 / held_out))
    moved = 0
    for image_dir in sorted(p for p in base.glob("*/*") if p.is_dir() and p.name != "masks"):
        ds_dir = image_dir.parent
        for i, img in enumerate(sorted(image_dir.iterdir())):
            if i % step != step - 1 or img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            target = new / ds_dir.name / image_dir.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(img, target / img.name)
            mask = ds_dir / "masks" / f"{img.stem}.png"
            if mask.exists():
                (new / ds_dir.name / "masks").mkdir(exist_ok=True)
                shutil.move(mask, new / ds_dir.name / "masks" / mask.name)
            moved += 1
        for meta in ("metadata.csv", "bboxes.json"):
            if (ds_dir / meta).exists() and (new / ds_dir.name).exists():
                shutil.copy2(ds_dir / meta, new / ds_dir.name / meta)
    return base, new, moved


def _reuse_line(ws: Path) -> str:
    from cogalign_core import reuse

    parts = []
    for stage in ("masks", "counterfactual"):
        try:
            c = reuse.read_counts(ws, stage)
            parts.append(f"{stage}: computed {c['computed']}, reused {c['reused']}")
        except FileNotFoundError:
            pass
    return "; ".join(parts)


def bench_data_stages(tmp: Path, source: Path) -> dict[str, float]:
    import csv

    from cogalign.runner import run_pipeline
    from cogalign.workspace import Workspace, init_workspace, register
    from cogalign_core import review, tables

    base, new, n_new = split_source(source, tmp / "source")
    ws = init_workspace(tmp / "ws", salt="bench-" + "0" * 58)
    register(Workspace.open(ws.root), base, layout="collection")
    until = "counterfactual"

    def run(label: str) -> tuple[float, dict[str, float], object]:
        t = time.perf_counter()
        outcome = run_pipeline(ws.root, until=until)
        seconds = time.perf_counter() - t
        stages = {str(s["stage"]): float(s["seconds"]) for s in outcome.stages if s["ran"]}
        print(f"  {label:<22} {seconds:8.2f} s  ran: {', '.join(f'{k} {v:.1f}s' for k, v in stages.items()) or '-'}")
        line = _reuse_line(ws.root)
        if line and stages:
            print(f"  {'':<22} {line}")
        return seconds, stages, outcome

    n_base = sum(1 for p in base.rglob("*") if p.suffix.lower() in (".jpg", ".png") and p.parent.name != "masks")
    print(f"data stages ({source}: {n_base} images, then +{n_new} new):")
    full_s, full_stages, _ = run("full run")
    cf_summary = json.loads((ws.root / "data/counterfactual/summary.json").read_text())
    print(f"  counterfactual coverage after the full run: {json.dumps(cf_summary['coverage'])}")
    noop_s, _, noop = run("no-op rerun")
    assert noop.up_to_date  # type: ignore[attr-defined]
    register(Workspace.open(ws.root), new, layout="collection")
    inc_s, _, _ = run("+10% new images")
    accepted = [r["sample_id"] for r in tables.read_rows(ws.root / "data/masks/masks.parquet", "masks")
                if r["status"] == "accepted"][:5]
    task = tmp / "review.csv"
    with open(task, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sample_id", "boxes"])
        writer.writeheader()
        writer.writerows({"sample_id": sid, "boxes": "[[20, 20, 120, 110]]"} for sid in accepted)
    review.import_review(ws.root, task)
    review_s, review_stages, _ = run("review import (5)")
    masks_ratio = review_stages.get("masks", 0.0) / full_stages["masks"]
    print(f"  no-op / full             {noop_s / full_s:.3f}  (goal <= 0.05)")
    print(f"  +10% / full              {inc_s / full_s:.3f}  (goal <= 0.25)")
    print(f"  review masks / full masks {masks_ratio:.3f}  (goal <= 0.1; whole review run {review_s / full_s:.3f} "
          "of the full run)")
    return {"full_s": full_s, "noop_s": noop_s, "inc_s": inc_s, "review_s": review_s}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def bench_counterfactual(tmp: Path, n_images: int) -> dict[str, float]:
    from cogalign_core import counterfactual, masks
    from cogalign_core.config import PipelineParams
    from cogalign_core.executor import DASK_ADDRESS_ENV, WORKERS_ENV
    from tests.mask_workspace import build_workspace

    ws = tmp / "cf"
    build_workspace(ws, kvasir=n_images * 2 // 3, cvc=n_images - n_images * 2 // 3, normal=1)
    params = PipelineParams()
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        os.environ[WORKERS_ENV] = "2"
        masks.run_stage(ws, params, None)
        times, digests = {}, {}
        for label, env in (("one process", {WORKERS_ENV: "1"}),
                           ("dask, 2 local workers", {WORKERS_ENV: "2", DASK_ADDRESS_ENV: "local"})):
            os.environ.pop(DASK_ADDRESS_ENV, None)
            os.environ.update(env)
            shutil.rmtree(ws / "data/counterfactual", ignore_errors=True)
            t = time.perf_counter()
            counterfactual.run_stage(ws, params, None)
            times[label] = time.perf_counter() - t
            digests[label] = _tree_digest(ws / "data/counterfactual")
    finally:
        os.chdir(cwd)
        os.environ.pop(DASK_ADDRESS_ENV, None)
        os.environ.pop(WORKERS_ENV, None)
    assert len(set(digests.values())) == 1, "Dask and single-process outputs differ"
    one, dask = times["one process"], times["dask, 2 local workers"]
    print(f"counterfactual stage on {n_images} lesion images (+1 normal), outputs identical:")
    print(f"  one process            {one:7.2f} s")
    print(f"  dask, 2 local workers  {dask:7.2f} s  speed-up {one / dask:.2f}x (cores: {os.cpu_count()})")
    return {"cf_one_s": one, "cf_dask_s": dask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data"),
                        help="collection of datasets for the data-stage part ('sample' = the bundled sample)")
    parser.add_argument("--cf-images", type=int, default=30, help="lesion images for the counterfactual part")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--skip-counterfactual", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        if not args.skip_data:
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=180):
                source = REPO / "data" / "sample" if args.source == "sample" else Path(args.source)
                bench_data_stages(Path(tmp), source)
        if not args.skip_counterfactual:
            bench_counterfactual(Path(tmp), args.cf_images)


if __name__ == "__main__":
    main()
