"""Pass-through of stored masks (ground truth or clinician-drawn), validated against the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MASK_THRESHOLD = 127


class MaskProblem(ValueError):
    """A stored mask that cannot be used; ``reason`` is machine-readable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)  # both in args, so the exception pickles across worker processes
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def load_mask(path: str | Path, shape: tuple[int, int], kind: str = "gt") -> np.ndarray:
    """Read a mask PNG as bool ``(H, W)`` (foreground > 127), checked against the image ``shape``.

    Raises :class:`MaskProblem` with reason ``<kind>_mask_unreadable``, ``<kind>_mask_size_mismatch``
    or ``<kind>_mask_empty``.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise MaskProblem(f"{kind}_mask_unreadable", f"{Path(path).name}: {e}") from e
    if arr.shape != tuple(shape):
        raise MaskProblem(f"{kind}_mask_size_mismatch", f"mask {arr.shape[::-1]} vs image {tuple(shape)[::-1]} (w, h)")
    mask = arr > MASK_THRESHOLD
    if not mask.any():
        raise MaskProblem(f"{kind}_mask_empty", "no foreground pixel")
    return mask
