"""Inpainters behind one small interface, so a learned inpainter can be added beside OpenCV's.

An inpainter fills the True pixels of a bool ``(H, W)`` mask in an RGB ``(H, W, 3)`` uint8 image and
must leave every other pixel bit-identical (the counterfactual stage checks this).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import cv2
import numpy as np


class Inpainter(Protocol):
    """Fills ``mask`` in ``image``; pixels outside ``mask`` are returned unchanged."""

    name: str

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


class OpenCVInpainter:
    """``cv2.inpaint`` with Telea's fast-marching method or the Navier-Stokes method."""

    _FLAGS: ClassVar[dict[str, int]] = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

    def __init__(self, method: str = "telea", radius: int = 5) -> None:
        if method not in self._FLAGS:
            raise ValueError(f"unknown OpenCV inpainting method {method!r}; expected one of {sorted(self._FLAGS)}")
        self.name = method
        self.radius = radius

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` with the True pixels of ``mask`` (bool ``(H, W)``) filled."""
        filled = cv2.inpaint(image, mask.astype(np.uint8), self.radius, self._FLAGS[self.name])
        out = image.copy()
        out[mask] = filled[mask]  # by construction nothing outside the mask can change
        return out


def build_inpainter(method: str, radius: int) -> Inpainter:
    """The inpainter named in params (``telea`` or ``ns``)."""
    return OpenCVInpainter(method, radius)
