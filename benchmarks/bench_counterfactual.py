"""Counterfactual stage vs a bare cv2.inpaint loop on the same images and masks (ratio bare/ours, goal >= 0.9).

Both sides run in one process on the same parents: the bare loop decodes each parent once, makes the
same inpaint calls the stage made (the stage's own fill masks, loaded before the timer, with the
stage's method and radius: one per counterfactual and control; for a "both" image one more call
unless its two regions are farther apart than the inpainting radius reaches, where the stage, and so
the bare loop, pastes the two fills together) and writes PNGs; ours adds mask loading, dilation,
FOV estimation, control placement, border clipping, QC, content addressing and the table.
Usage: python benchmarks/bench_counterfactual.py [--n 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cogalign_core import counterfactual, masks, tables
from cogalign_core.config import PipelineParams
from cogalign_core.executor import WORKERS_ENV
from cogalign_core.io import PNG_COMPRESS_LEVEL
from tests.mask_workspace import build_workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="kvasir-seg images (plus as many cvc-clinicdb)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d)
        build_workspace(ws, kvasir=args.n, cvc=args.n, normal=0)
        os.environ[WORKERS_ENV] = "1"  # one process: the bare loop below is serial too
        params = PipelineParams()
        cp = params.counterfactual
        with contextlib.chdir(ws):
            masks.run_stage(ws, params, None)
            t0 = time.perf_counter()
            counterfactual.run_stage(ws, params, None)
            ours = time.perf_counter() - t0
        rows = [r for r in tables.read_rows(ws / "data/counterfactual/counterfactuals.parquet") if r["image_path"]]
        parents = {r["sample_id"]: r for r in tables.read_rows(ws / "data/annotate/annotations.parquet")}
        fills: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        for r in rows:
            fills[r["parent_sample_id"]][r["kind"]] = np.asarray(Image.open(ws / r["fill_mask_path"])) > 127
        method = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}[cp.inpainter]
        reach = 2 * cp.inpaint_radius + 2
        out = ws / "bare"
        out.mkdir()
        calls = 0
        t0 = time.perf_counter()
        for parent, kinds in fills.items():
            img = np.asarray(Image.open(ws / parents[parent]["image_path"]).convert("RGB"))
            done: dict[str, np.ndarray] = {}
            for kind, fill in kinds.items():
                if kind == "both" and "control" in done and \
                        not counterfactual.dilate(kinds["counterfactual_normal"], reach)[kinds["control"]].any():
                    res = done["counterfactual_normal"].copy()
                    res[kinds["control"]] = done["control"][kinds["control"]]
                else:
                    res = cv2.inpaint(img, fill.astype(np.uint8), cp.inpaint_radius, method)
                    calls += 1
                done[kind] = res
                Image.fromarray(res).save(out / f"{parent}-{kind}.png", compress_level=PNG_COMPRESS_LEVEL)
        bare = time.perf_counter() - t0
        summary = json.loads((ws / "data/counterfactual/summary.json").read_text())
        print(f"one process each; {len(fills)} parents, derived images: {len(rows)}, inpaint calls: {calls}; "
              f"ours {ours:.2f}s, bare cv2.inpaint loop {bare:.2f}s, ratio bare/ours = {bare / ours:.2f} (goal >= 0.9)")
        print("coverage:", json.dumps(summary["coverage"]))


if __name__ == "__main__":
    main()
