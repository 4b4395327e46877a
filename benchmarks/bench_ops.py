"""Operations benchmark: no-op rerun and +10 % new images vs a full run of the data stages, and the
counterfactual stage on 2 local Dask workers vs one process.

    python benchmarks/bench_ops.py [--cf-images N]

1. Data stages (``ingest_batch`` + ``ingest`` + ``annotate``) through ``run_pipeline(until="annotate")``
   on the bundled sample (292 images), against one Prefect server started beforehand (its start-up
   is not a pipeline cost). Times: full run on a fresh workspace; a no-op rerun (nothing changed:
   DVC skips every stage); a rerun after registering a batch of +10 % new real images (sample
   frames rotated 90 degrees). Goals: no-op <= 5 % of full, +10 % <= 25 % of full.
2. ``counterfactual.run_stage`` on a mask workspace of N accepted lesion images: one process
   (``COGALIGN_WORKERS=1``) vs a local Dask cluster of 2 workers (``COGALIGN_DASK_ADDRESS=local``,
   cluster start-up included, since a stage pays it). Outputs are checked byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.mask_workspace builds the counterfactual workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _new_batch(dst: Path, n: int) -> Path:
    """``n`` new real images: bundled Kvasir-SEG frames (with masks) rotated by 90 degrees."""
    src = REPO / "data" / "sample" / "kvasir-seg"
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for img in sorted((src / "images").glob("*.jpg"))[:n]:
        with Image.open(img) as im:
            im.transpose(Image.Transpose.ROTATE_90).save(dst / "images" / img.name, quality=92)
        with Image.open(src / "masks" / f"{img.stem}.png") as m:
            m.transpose(Image.Transpose.ROTATE_90).save(dst / "masks" / f"{img.stem}.png")
    return dst


def bench_data_stages(tmp: Path) -> dict[str, float]:
    from cogalign.runner import run_pipeline
    from cogalign.workspace import Workspace, init_workspace, register
    from cogalign_core import tables

    ws = init_workspace(tmp / "ws", sample=True, salt="bench-" + "0" * 58)
    t = time.perf_counter()
    full = run_pipeline(ws.root, until="annotate")
    full_s = time.perf_counter() - t
    n_images = len(tables.read_rows(ws.root / "data/ingest/samples.parquet"))
    assert all(s["ran"] for s in full.stages)

    t = time.perf_counter()
    noop = run_pipeline(ws.root, until="annotate")
    noop_s = time.perf_counter() - t
    assert noop.up_to_date

    n_new = max(1, round(n_images * 0.10))
    register(Workspace.open(ws.root), _new_batch(tmp / "new-batch", n_new))
    t = time.perf_counter()
    inc = run_pipeline(ws.root, until="annotate")
    inc_s = time.perf_counter() - t
    ran = {s["stage"]: s["ran"] for s in inc.stages}
    assert ran["ingest_batch@b0001"] is False and ran["ingest_batch@b0002"] is True
    print(f"data stages on {n_images} images (+{n_new} new):")
    per_stage = ", ".join(f"{s['stage']} {s['seconds']}s" for s in full.stages)
    print(f"  full run        {full_s:7.2f} s  ({per_stage})")
    print(f"  no-op rerun     {noop_s:7.2f} s  ratio {noop_s / full_s:.3f}  (goal <= 0.05)")
    print(f"  +10% new images {inc_s:7.2f} s  ratio {inc_s / full_s:.3f}  (goal <= 0.25)")
    return {"full_s": full_s, "noop_s": noop_s, "inc_s": inc_s}


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
    parser.add_argument("--cf-images", type=int, default=30, help="lesion images for the counterfactual part")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--skip-counterfactual", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        if not args.skip_data:
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=180):
                bench_data_stages(Path(tmp))
        if not args.skip_counterfactual:
            bench_counterfactual(Path(tmp), args.cf_images)


if __name__ == "__main__":
    main()
