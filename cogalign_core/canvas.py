"""The one way every image is shown to the model: a fixed square canvas with identical masking.

Each source (Kvasir, CVC-ClinicDB, HyperKvasir, counterfactual images) has its own frame size,
black borders and burnt-in overlays (Kvasir's green scope-position box in the lower-left corner,
CVC's rounded black frame). If those differed between sources, the model could learn "which
dataset" instead of "which finding". So every image is

1. letterboxed (aspect-preserving resize, centred, black padding) onto a ``size`` x ``size`` canvas;
2. masked the same way regardless of source: a black band of ``border_frac`` around the content
   area, its four corners cut off by triangles of leg ``corner_frac`` (the scope's rounded frame),
   and a black square of side ``overlay_frac`` in the content area's lower-left corner (where
   Kvasir burns in the scope-position overlay).

Box frame: :func:`box_to_canvas` maps a pixel box of the stored image (inclusive corners, origin
top-left, x right) to integers in [0, 1000] on the canvas (``x1,y1,x2,y2``, exclusive max), the
frame of ``answer_format``'s ``<box>`` tag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cogalign_core.answer_format import BOX_SCALE


@dataclass(frozen=True)
class CanvasSpec:
    """Canvas geometry and masking, identical for every source.

    Attributes:
        size: side of the square canvas in pixels.
        border_frac: black band around the content area, as a fraction of the content's shorter side.
        corner_frac: leg of the corner triangles cut off the content area, fraction of its shorter side.
        overlay_frac: side of the black square in the content's lower-left corner, fraction of its shorter side.
    """

    size: int = 224
    border_frac: float = 0.03
    corner_frac: float = 0.12
    overlay_frac: float = 0.28

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"canvas size {self.size} is too small (>= 16 px)")
        for name in ("border_frac", "corner_frac", "overlay_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 0.5:
                raise ValueError(f"{name}={v} must be in [0, 0.5)")


@dataclass(frozen=True)
class Letterbox:
    """Placement of a ``width`` x ``height`` image on the canvas: ``canvas = pixel * scale + offset``."""

    scale: float
    off_x: int
    off_y: int
    new_w: int
    new_h: int


def letterbox(width: int, height: int, size: int) -> Letterbox:
    """Aspect-preserving placement of a ``width`` x ``height`` image, centred on a ``size`` canvas."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = size / max(width, height)
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    return Letterbox(scale, (size - new_w) // 2, (size - new_h) // 2, new_w, new_h)


def content_mask(lb: Letterbox, spec: CanvasSpec) -> np.ndarray:
    """Boolean (size, size) array: True where image content stays visible after masking."""
    keep = np.zeros((spec.size, spec.size), dtype=bool)
    short = min(lb.new_w, lb.new_h)
    b = round(short * spec.border_frac)
    x0, y0, x1, y1 = lb.off_x + b, lb.off_y + b, lb.off_x + lb.new_w - b, lb.off_y + lb.new_h - b
    if x1 <= x0 or y1 <= y0:
        return keep
    keep[y0:y1, x0:x1] = True
    c = round(short * spec.corner_frac)
    if c > 0:
        yy, xx = np.mgrid[0:spec.size, 0:spec.size]
        dx0, dx1, dy0, dy1 = xx - x0, (x1 - 1) - xx, yy - y0, (y1 - 1) - yy
        for dx, dy in ((dx0, dy0), (dx1, dy0), (dx0, dy1), (dx1, dy1)):
            keep &= ~((dx + dy) < c)
    o = round(short * spec.overlay_frac)
    if o > 0:
        keep[max(y0, y1 - o):y1, x0:min(x1, x0 + o)] = False
    return keep


def to_canvas(image: Image.Image | np.ndarray, spec: CanvasSpec) -> Image.Image:
    """Letterbox and mask ``image`` (PIL or HxWx3 uint8 RGB array) onto an RGB ``spec.size`` square.

    Returns a new PIL RGB image; masked and padded pixels are black (0, 0, 0).
    """
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    pil = pil.convert("RGB")
    lb = letterbox(pil.width, pil.height, spec.size)
    resized = pil.resize((lb.new_w, lb.new_h), Image.Resampling.BILINEAR)
    canvas = np.zeros((spec.size, spec.size, 3), dtype=np.uint8)
    canvas[lb.off_y:lb.off_y + lb.new_h, lb.off_x:lb.off_x + lb.new_w] = np.asarray(resized)
    canvas[~content_mask(lb, spec)] = 0
    return Image.fromarray(canvas, "RGB")


def load_canvas(path: str | os.PathLike[str], spec: CanvasSpec) -> Image.Image:
    """Open an image file and put it on the canvas (see :func:`to_canvas`)."""
    with Image.open(path) as im:
        im.load()
        return to_canvas(im, spec)


def box_to_canvas(box: Sequence[int], width: int, height: int, spec: CanvasSpec) -> tuple[int, int, int, int]:
    """Map a pixel box ``(xmin, ymin, xmax, ymax)`` (inclusive, stored-image frame) to the 0-1000 canvas frame.

    Returns integers ``(x1, y1, x2, y2)`` with ``0 <= x1 < x2 <= 1000`` (exclusive max), clamped to
    the canvas; a degenerate box is widened to one unit so it stays a valid ``<box>``.
    """
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    if xmax < xmin or ymax < ymin:
        raise ValueError(f"malformed box {tuple(box)}: max < min")
    lb = letterbox(width, height, spec.size)
    unit = BOX_SCALE / spec.size

    def conv(v: float, off: int) -> int:
        return round(min(max((v * lb.scale + off) * unit, 0.0), float(BOX_SCALE)))

    x1, y1 = conv(xmin, lb.off_x), conv(ymin, lb.off_y)
    x2, y2 = conv(xmax + 1, lb.off_x), conv(ymax + 1, lb.off_y)
    if x2 <= x1:
        x1, x2 = (x1, x1 + 1) if x1 < BOX_SCALE else (x1 - 1, x1)
    if y2 <= y1:
        y1, y2 = (y1, y1 + 1) if y1 < BOX_SCALE else (y1 - 1, y1)
    return x1, y1, x2, y2


def union_box(boxes: Sequence[Sequence[int]]) -> tuple[int, int, int, int] | None:
    """Smallest box holding every box in ``boxes`` (same frame), or ``None`` when there are none."""
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
