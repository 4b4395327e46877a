"""Inpainters behind one small interface, so a learned inpainter can be added beside OpenCV's.

An inpainter fills the True pixels of a bool ``(H, W)`` mask in an RGB ``(H, W, 3)`` uint8 image and
must leave every other pixel bit-identical (the counterfactual stage checks this). Pixels marked
``invalid`` (the black border around the endoscope's lens) are never used as sources: they are
replaced by the nearest valid pixel before filling, as an image edge is replicated, and keep their
own values in the output.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import cv2
import numpy as np


class Inpainter(Protocol):
    """Fills ``mask`` in ``image``; pixels outside ``mask`` are returned unchanged."""

    name: str

    def inpaint(self, image: np.ndarray, mask: np.ndarray, invalid: np.ndarray | None = None) -> np.ndarray: ...


def roi(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """(rows, cols) slices of ``mask``'s bounding box grown by ``pad`` px, clipped to the frame."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    if ys.size == 0:
        return slice(0, 0), slice(0, 0)
    return (slice(max(0, int(ys[0]) - pad), min(h, int(ys[-1]) + pad + 1)),
            slice(max(0, int(xs[0]) - pad), min(w, int(xs[-1]) + pad + 1)))


def replicate_into(image: np.ndarray, invalid: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """Copy of ``image`` whose ``invalid`` pixels take the value of the nearest pixel that is neither
    invalid nor ``unknown`` (Euclidean distance; ``cv2.distanceTransformWithLabels``)."""
    known = ~(invalid | unknown)
    out = image.copy()
    if not invalid.any() or not known.any():
        return out
    _, labels = cv2.distanceTransformWithLabels((~known).astype(np.uint8), cv2.DIST_L2, 5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    ky, kx = np.nonzero(known)
    position = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    position[labels[ky, kx]] = np.arange(ky.size)
    iy, ix = np.nonzero(invalid)
    nearest = position[labels[iy, ix]]
    out[iy, ix] = image[ky[nearest], kx[nearest]]
    return out


class OpenCVInpainter:
    """``cv2.inpaint`` with Telea's fast-marching method or the Navier-Stokes method.

    Only the mask's bounding box grown by ``radius + 2`` px is handed to ``cv2.inpaint``: both
    methods read known pixels within ``radius`` of the region only, so the result equals a
    full-frame call (tested) at a fraction of the cost on a small lesion.
    """

    _FLAGS: ClassVar[dict[str, int]] = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

    def __init__(self, method: str = "telea", radius: int = 5) -> None:
        if method not in self._FLAGS:
            raise ValueError(f"unknown OpenCV inpainting method {method!r}; expected one of {sorted(self._FLAGS)}")
        self.name = method
        self.radius = radius

    def inpaint(self, image: np.ndarray, mask: np.ndarray, invalid: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` with the True pixels of ``mask`` (bool ``(H, W)``) filled."""
        out = image.copy()
        rows, cols = roi(mask, self.radius + 2)
        crop, crop_mask = image[rows, cols], mask[rows, cols]
        if not crop_mask.any():
            return out
        if invalid is not None:
            crop_invalid = invalid[rows, cols] & ~crop_mask
            if crop_invalid.any():
                crop = replicate_into(crop, crop_invalid, crop_mask)
        filled = cv2.inpaint(np.ascontiguousarray(crop), crop_mask.astype(np.uint8), self.radius,
                             self._FLAGS[self.name])
        window = out[rows, cols]
        window[crop_mask] = filled[crop_mask]  # by construction nothing outside the mask can change
        return out


def build_inpainter(method: str, radius: int) -> Inpainter:
    """The inpainter named in params (``telea`` or ``ns``)."""
    return OpenCVInpainter(method, radius)
