"""Mask segmenters' throughput (images/s) on the bundled sample's polyps, with ground-truth boxes.

CPU segmenters (box_ellipse, grabcut) always; ``sam`` with a randomly initialised model of the real
ViT-B size (``segment_anything.build_sam_vit_b`` without a checkpoint; speed does not depend on the
weights) when ``--sam`` is given — on CPU this is slow, the GPU goal is >= 20 img/s on an H100.
Dice vs the expert masks is printed beside each speed so speed is never read without quality
(random SAM weights give meaningless Dice, so it is not printed for them).

    python benchmarks/bench_masks.py [--limit 60] [--sam] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cogalign_core.config.masks import MaskParams
from cogalign_core.segmenters import Prompt, build_segmenter
from cogalign_core.segmenters.quality import dice

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def load_cases(limit: int) -> list[tuple[np.ndarray, list[Prompt], np.ndarray]]:
    """(RGB image HxWx3 uint8, box prompts in pixel frame, GT mask HxW bool) of sample polyps."""
    cases = []
    boxes = json.loads((SAMPLE / "kvasir-seg" / "bboxes.json").read_text())
    for stem in sorted(boxes)[:limit]:
        image = np.asarray(Image.open(SAMPLE / "kvasir-seg" / "images" / f"{stem}.jpg").convert("RGB"))
        gt = np.asarray(Image.open(SAMPLE / "kvasir-seg" / "masks" / f"{stem}.png").convert("L")) > 127
        prompts = [Prompt(box=(b["xmin"], b["ymin"], b["xmax"], b["ymax"])) for b in boxes[stem]["bbox"]]
        if prompts:
            cases.append((image, prompts, gt))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--sam", action="store_true", help="also time SAM ViT-B (random weights)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cases = load_cases(args.limit)
    params = MaskParams()
    print(f"{len(cases)} Kvasir-SEG sample images, ground-truth boxes")
    for name in ("box_ellipse", "grabcut"):
        seg = build_segmenter(name, params)
        start = time.perf_counter()
        predicted = [seg.segment(img, prompts).mask for img, prompts, _ in cases]
        seconds = time.perf_counter() - start  # segmentation only; quality is scored after the clock
        scores = [dice(mask, gt) for mask, (_, _, gt) in zip(predicted, cases, strict=True)]
        print(f"{name:12s} {len(cases) / seconds:8.1f} img/s   mean Dice vs GT {np.mean(scores):.3f}")
    if args.sam:
        import torch
        from segment_anything import build_sam_vit_b

        from cogalign_core.segmenters.sam import SamSegmenter

        torch.manual_seed(0)
        model = build_sam_vit_b(checkpoint=None).to(args.device).eval()
        seg = SamSegmenter(model, image_batch_size=8)
        seg.segment_batch([c[0] for c in cases[:2]], [c[1] for c in cases[:2]])  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        seg.segment_batch([c[0] for c in cases], [c[1] for c in cases])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"{'sam vit_b':12s} {len(cases) / seconds:8.1f} img/s   (random weights: Dice not meaningful; "
              f"device {args.device})")


if __name__ == "__main__":
    main()
