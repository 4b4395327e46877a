"""Counterfactual stage vs a bare cv2.inpaint loop on the same images and masks (ratio bare/ours, goal >= 0.9).

The bare loop does the same inpaint calls the stage made (one per derived image, same fill masks) plus
reading and PNG-writing; ours adds FOV estimation, control placement, QC and the table.
Usage: python benchmarks/bench_counterfactual.py [--n 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cogalign_core import counterfactual, masks, tables
from cogalign_core.config import PipelineParams
from tests.mask_workspace import build_workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="kvasir-seg images (plus as many cvc-clinicdb)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ws = Path(d)
        build_workspace(ws, kvasir=args.n, cvc=args.n, normal=0)
        os.chdir(ws)
        params = PipelineParams()
        masks.run_stage(ws, params, None)
        t0 = time.perf_counter()
        counterfactual.run_stage(ws, params, None)
        ours = time.perf_counter() - t0
        rows = [r for r in tables.read_rows(ws / "data/counterfactual/counterfactuals.parquet") if r["image_path"]]
        parents = {r["sample_id"]: r for r in tables.read_rows(ws / "data/annotate/annotations.parquet")}
        out = ws / "bare"
        out.mkdir()
        t0 = time.perf_counter()
        for i, r in enumerate(rows):
            img = np.asarray(Image.open(ws / parents[r["parent_sample_id"]]["image_path"]).convert("RGB"))
            fill = (np.asarray(Image.open(ws / r["fill_mask_path"])) > 127).astype(np.uint8)
            res = cv2.inpaint(img, fill, 5, cv2.INPAINT_TELEA)
            Image.fromarray(res).save(out / f"{i}.png", compress_level=6)
        bare = time.perf_counter() - t0
        print(f"derived images: {len(rows)}; ours {ours:.2f}s, bare cv2.inpaint loop {bare:.2f}s, "
              f"ratio bare/ours = {bare / ours:.2f}")


if __name__ == "__main__":
    main()
