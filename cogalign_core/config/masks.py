"""Parameters of the mask stage: which segmenter turns prompts into lesion masks, and the QC gates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cogalign_core import contract

SegmenterName = Literal["sam", "box_ellipse", "grabcut", "ground_truth"]
PromptSegmenterName = Literal["sam", "box_ellipse", "grabcut"]


class SamParams(BaseModel):
    """segment-anything (SAM) settings; only read when `sam` is the segmenter or a QC segmenter."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(
        None,
        description="Path (workspace-relative or absolute) of the official SAM checkpoint, e.g. "
        "sam_vit_b_01ec64.pth. Required when `sam` is used: the stage never runs with random weights.")
    model_type: Literal["vit_b", "vit_l", "vit_h"] = Field(
        "vit_b", description="SAM image-encoder size; must match the checkpoint.")
    multimask: bool = Field(
        True, description="Ask SAM for its 3 candidate masks per prompt and keep the best-scoring one.")


class MaskQcParams(BaseModel):
    """Gates that send an accepted mask to the review queue (data/masks/review.parquet)."""

    model_config = ConfigDict(extra="forbid")
    min_area_fraction: float = Field(
        0.0005, ge=0, le=1, description="Masks covering less of the frame than this go to review (mask_too_small).")
    max_area_fraction: float = Field(
        0.9, ge=0, le=1, description="Masks covering more of the frame than this go to review (mask_too_large).")
    max_components: int = Field(
        5, ge=1, description="Masks with more 8-connected components than this go to review (too_many_components).")
    min_box_coverage: float = Field(
        0.2, ge=0, le=1,
        description="Prompt-derived masks must cover at least this fraction of their prompt boxes' area "
        "(low_prompt_agreement otherwise).")
    min_sam_score: float = Field(
        0.5, ge=0, le=1, description="SAM masks whose predicted IoU is below this go to review (low_sam_score).")
    min_dice_vs_gt: float = Field(
        0.5, ge=0, le=1,
        description="When ground truth exists but is not the accepted mask, a Dice below this sends the "
        "sample to review (low_dice_vs_gt).")


class MaskParams(BaseModel):
    """Lesion mask segmentation and quality control."""

    model_config = ConfigDict(extra="forbid")
    segmenter: PromptSegmenterName = Field(
        "box_ellipse",
        description="Segmenter that turns prompts (boxes/points) into the accepted mask where no ground-truth "
        "or clinician mask exists: sam | box_ellipse | grabcut.")
    use_ground_truth: bool = Field(
        True, description="Pass ground-truth masks through as the accepted mask wherever they exist.")
    qc_segmenters: list[PromptSegmenterName] = Field(
        default_factory=lambda: ["box_ellipse", "grabcut"],
        description="Segmenters also run, where ground truth exists, only to measure Dice/IoU vs ground truth "
        "and vs the box_ellipse baseline (qc.json). The accepted segmenter is always measured.")
    qc_fraction: float = Field(
        0.15, ge=0, le=1,
        description="Share of ground-truth samples on which the QC-only segmenters run, chosen per sample by a "
        "seeded hash (so adding samples never changes another sample's QC); 1 = all. GrabCut costs about a "
        "second per image on a CPU core.")
    grabcut_iterations: int = Field(5, ge=1, description="GrabCut iterations per box.")
    seed: int = Field(0, description="Seed of OpenCV's RNG (cv2.setRNGSeed) before every GrabCut call.")
    clinician_prompts: str = Field(
        contract.CLINICIAN_PROMPTS,
        description="Workspace-relative table written by `cogalign review import` (boxes, points, masks with "
        "provenance clinician); a DVC dependency of the mask stage. Missing file = no clinician prompts.")
    sam: SamParams = Field(default_factory=SamParams, description=SamParams.__doc__)
    qc: MaskQcParams = Field(default_factory=MaskQcParams, description=MaskQcParams.__doc__)
