"""OpenCV GrabCut from prompt boxes, seeded so reruns give identical masks."""

from __future__ import annotations

import cv2
import numpy as np

from cogalign_core.segmenters.base import PromptNeedsBox, Prompts, SegmentResult


class GrabCutSegmenter:
    """GrabCut initialised with each prompt box (rectangle mode), union over boxes.

    Prompt points, when given with a box, are written into the GrabCut mask as definite
    foreground/background seeds. ``cv2.setRNGSeed(seed)`` runs before every call because GrabCut's
    GMM initialisation draws from OpenCV's global RNG.
    """

    name = "grabcut"

    def __init__(self, iterations: int = 5, seed: int = 0) -> None:
        self.iterations = iterations
        self.seed = seed

    def segment(self, image: np.ndarray, prompts: Prompts) -> SegmentResult:
        """``image``: ``(H, W, 3)`` uint8 RGB; returns the union of per-box GrabCut foregrounds."""
        h, w = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        out = np.zeros((h, w), dtype=bool)
        for p in prompts:
            if p.box is None:
                raise PromptNeedsBox(f"{self.name} needs a box prompt; point-only prompts need sam")
            x0, y0, x1, y1 = p.box
            gc = np.full((h, w), cv2.GC_BGD, dtype=np.uint8)
            gc[y0:y1 + 1, x0:x1 + 1] = cv2.GC_PR_FGD
            for x, y, label in p.points:
                gc[y, x] = cv2.GC_FGD if label else cv2.GC_BGD
            if (x1 - x0) < 2 or (y1 - y0) < 2:
                out[y0:y1 + 1, x0:x1 + 1] = True  # too small for GMMs: the box is the answer
                continue
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            cv2.setRNGSeed(self.seed)
            try:
                cv2.grabCut(bgr, gc, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
            except cv2.error:
                # GrabCut refuses degenerate colour statistics (e.g. a flat box); fall back to the box.
                out[y0:y1 + 1, x0:x1 + 1] = True
                continue
            out |= (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        return SegmentResult(mask=out, score=None)
