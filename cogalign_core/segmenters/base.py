"""Prompt and result types shared by every segmenter, and the segmenter protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Box = tuple[int, int, int, int]


class PromptNeedsBox(ValueError):
    """The segmenter cannot use the given prompt (e.g. points without a box for box_ellipse)."""


@dataclass(frozen=True)
class Prompt:
    """One lesion prompt in the stored image's pixel frame.

    ``box`` is ``(xmin, ymin, xmax, ymax)`` inclusive, or ``None``; ``points`` are ``(x, y, label)``
    with label 1 = lesion, 0 = background.
    """

    box: Box | None = None
    points: tuple[tuple[int, int, int], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly form (stored in masks.parquet's ``prompt_json``)."""
        return {"box": list(self.box) if self.box else None, "points": [list(p) for p in self.points]}


Prompts = Sequence[Prompt]


@dataclass
class SegmentResult:
    """A segmenter's output for one image: the union over prompts.

    ``mask``: bool ``(H, W)``; ``score``: the segmenter's own confidence (SAM's predicted IoU, mean
    over prompts) or ``None``; ``per_prompt_scores``: one per prompt when the segmenter scores.
    """

    mask: np.ndarray
    score: float | None = None
    per_prompt_scores: list[float] = field(default_factory=list)


class Segmenter(Protocol):
    """Turns one RGB image ``(H, W, 3)`` uint8 and its prompts into a lesion mask."""

    name: str

    def segment(self, image: np.ndarray, prompts: Prompts) -> SegmentResult: ...


def clip_box(box: Box, width: int, height: int) -> Box:
    """Clip an inclusive box to the frame."""
    x0, y0, x1, y1 = box
    return (min(max(x0, 0), width - 1), min(max(y0, 0), height - 1),
            min(max(x1, 0), width - 1), min(max(y1, 0), height - 1))
