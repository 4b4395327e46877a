"""Lesion segmenters behind one interface, and mask quality figures.

``build_segmenter(name, ...)`` returns an object with ``segment(image, prompts) -> SegmentResult``.
``sam`` is imported lazily (torch + segment_anything) only when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cogalign_core.segmenters.base import Prompt, PromptNeedsBox, Prompts, Segmenter, SegmentResult
from cogalign_core.segmenters.box_ellipse import BoxEllipseSegmenter
from cogalign_core.segmenters.grabcut import GrabCutSegmenter

if TYPE_CHECKING:
    from cogalign_core.config.masks import MaskParams

PROMPT_SEGMENTERS: tuple[str, ...] = ("sam", "box_ellipse", "grabcut")
BASELINE = "box_ellipse"

__all__ = ["BASELINE", "PROMPT_SEGMENTERS", "Prompt", "PromptNeedsBox", "Prompts", "SegmentResult", "Segmenter",
           "build_segmenter"]


def build_segmenter(name: str, params: MaskParams, workspace: Path | None = None) -> Segmenter:
    """The segmenter ``name`` configured from the mask params (``sam`` loads its checkpoint)."""
    if name == "box_ellipse":
        return BoxEllipseSegmenter()
    if name == "grabcut":
        return GrabCutSegmenter(iterations=params.grabcut_iterations, seed=params.seed)
    if name == "sam":
        from cogalign_core.segmenters.sam import SamSegmenter, load_sam
        from cogalign_core.settings import load_settings

        settings = load_settings(workspace)  # device and batch size: execution settings, not params
        model = load_sam(params.sam.model_type, params.sam.checkpoint, workspace, settings.sam_device)
        return SamSegmenter(model, image_batch_size=settings.sam_batch_size, multimask=params.sam.multimask)
    raise ValueError(f"unknown segmenter {name!r}; expected one of {PROMPT_SEGMENTERS}")
