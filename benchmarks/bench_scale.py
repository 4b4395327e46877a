"""Scale benchmark: the merge (with near-duplicate clustering) and annotate stages on synthetic rows.

    python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--batches 10]

For each size N a child process writes N synthetic sample records (no images: annotate uses the
records' boxes) as ``--batches`` ingested batches, then runs the real stage functions
``ingest_merge.run_stage`` and ``annotate.run_stage`` and reports their seconds and the child's peak
resident memory. About 5 % of the rows are planted near-duplicates of earlier rows (a few bits
flipped), a third of the rows belong to CVC-style sequences, a tenth are normals. The growth
exponent is the slope of log(seconds) over log(N) between consecutive sizes (1 = linear). CPU
seconds (all threads of the child) and the load average are printed beside the wall time: on a
shared machine the wall time says as much about the neighbours as about the code.
Goals at 10**6 on 2 cores: <= 60 s, <= 4 GiB, exponent <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from cogalign_core import tables
from cogalign_core.config import PARAMS_FILE, PipelineParams, dump_params
from cogalign_core.io import atomic_write_json

DATASETS = ("kvasir-seg", "cvc-clinicdb", "kvasir-v2")


def synthetic_batches(root: Path, n: int, batches: int, seed: int = 0) -> list[str]:
    """Write ``n`` synthetic SAMPLES rows as ``batches`` ingested batches under ``root``; return batch ids."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    dup = rng.random(n) < 0.05
    dup[0] = False
    src = (rng.random(n) * np.arange(n)).astype(np.int64)  # an earlier row
    flips = np.zeros(n, dtype=np.uint64)
    for _ in range(3):
        flips |= np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64)
    hashes[dup] = hashes[src[dup]] ^ flips[dup]
    kind = rng.choice(3, size=n, p=[0.57, 0.33, 0.10])
    ids = np.char.add("s", np.char.mod("%016x", rng.integers(0, 2**62, size=n, dtype=np.int64)))
    widths = np.where(kind == 1, 384, 622).astype(np.int32)
    heights = np.where(kind == 1, 288, 530).astype(np.int32)
    x0 = (rng.random(n) * (widths - 100)).astype(np.int32)
    y0 = (rng.random(n) * (heights - 100)).astype(np.int32)
    box_struct = pa.StructArray.from_arrays([pa.array(x0), pa.array(y0), pa.array(x0 + 80), pa.array(y0 + 70)],
                                            fields=list(tables.BOX))
    offsets = np.concatenate(([0], np.cumsum(kind != 2))).astype(np.int32)
    boxes = pa.ListArray.from_arrays(pa.array(offsets), box_struct.filter(pa.array(kind != 2)))
    out = []
    per = math.ceil(n / batches)
    for b in range(batches):
        lo, hi = b * per, min(n, (b + 1) * per)
        if lo >= hi:
            break
        bid = f"b{b + 1:04d}"
        k = kind[lo:hi]
        cols = {
            "sample_id": ids[lo:hi].tolist(), "batch_id": [bid] * (hi - lo), "role": ["train"] * (hi - lo),
            "dataset": [DATASETS[i] for i in k],
            "class_label": [("normal-cecum" if i == 2 else None) for i in k],
            "name_hash": ids[lo:hi].tolist(),
            "group_id_hash": [(f"seq{(lo + j) // 20}" if k[j] == 1 else None) for j in range(hi - lo)],
            "image_path": np.char.add(f"data/ingest/batches/{bid}/images/", ids[lo:hi]).tolist(),
            "image_sha256": ids[lo:hi].tolist(), "width": widths[lo:hi], "height": heights[lo:hi],
            "source_format": ["JPEG"] * (hi - lo), "source_mode": ["RGB"] * (hi - lo),
            "metadata_stripped": [False] * (hi - lo),
            "phash": np.char.mod("%016x", hashes[lo:hi]).tolist(), "near_dup_cluster": [None] * (hi - lo),
            "mask_path": [None] * (hi - lo), "mask_sha256": [None] * (hi - lo),
            "mask_binarise_threshold": [None] * (hi - lo), "mask_area_fraction": [None] * (hi - lo),
            "boxes": boxes.slice(lo, hi - lo), "kvasir_sessile": [None] * (hi - lo),
            "labels": pa.nulls(hi - lo, tables.SAMPLES.field("labels").type),  # no labels given at ingest
        }
        table = pa.table({f.name: pa.array(cols[f.name]) if not isinstance(cols[f.name], pa.Array)
                          else cols[f.name] for f in tables.SAMPLES})
        bdir = root / "data/ingest/batches" / bid
        tables.write_table(table, bdir / "records.parquet", tables.SAMPLES, "samples")
        tables.write_rows([], bdir / "quarantine.parquet", tables.QUARANTINE, "quarantine")
        tables.write_rows([], bdir / "duplicates.parquet", tables.DUPLICATES, "duplicates")
        atomic_write_json(bdir / "summary.json", {"seen": hi - lo})
        out.append(bid)
    return out


def one_size(n: int, batches: int) -> dict[str, float]:
    """Run in a child process: build, merge, annotate; seconds per step and peak RSS."""
    from cogalign_core import annotate, ingest_merge

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        ws = Path(tmp)
        ids = synthetic_batches(ws, n, batches)
        params = PipelineParams.model_validate({"batches": ids, "privacy": {"salt": "bench"},
                                                "annotate": {"clinician_csv": None}})
        (ws / PARAMS_FILE).write_text(dump_params(params))
        c0, t0 = time.process_time(), time.perf_counter()
        ingest_merge.run_stage(ws, params, None)
        t1 = time.perf_counter()
        annotate.run_stage(ws, params, None)
        c2, t2 = time.process_time(), time.perf_counter()
        merged = json.loads((ws / "data/ingest/summary.json").read_text())
        annotated = json.loads((ws / "data/annotate/summary.json").read_text())
    return {"n": n, "merge_s": t1 - t0, "annotate_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "clusters": merged["near_duplicate_clusters"], "annotated": annotated["annotated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_size(args.child, args.batches)))
        return
    results = []
    load = os.getloadavg()
    for n in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--batches", str(args.batches)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} (2 idle cores: < 2)")
    print(f"{'rows':>9} {'merge s':>8} {'annotate s':>10} {'total s':>8} {'CPU s':>7} {'peak GiB':>9} {'exponent':>9}")
    for prev, r in zip([None, *results], results, strict=False):
        exp = (math.log(r["total_s"] / prev["total_s"]) / math.log(r["n"] / prev["n"])) if prev else float("nan")
        print(f"{r['n']:>9} {r['merge_s']:>8.2f} {r['annotate_s']:>10.2f} {r['total_s']:>8.2f} {r['cpu_s']:>7.2f} "
              f"{r['peak_gib']:>9.2f} {exp:>9.2f}")
    last = results[-1]
    print(f"goals at {last['n']}: total {last['total_s']:.1f} s (<= 60), peak {last['peak_gib']:.2f} GiB (<= 4), "
          f"exponent {exp:.2f} (<= 1.2)")


if __name__ == "__main__":
    main()
