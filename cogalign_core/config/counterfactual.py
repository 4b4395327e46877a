"""Parameters of the counterfactual stage: lesion removal, matched controls, field-of-view estimate."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FovParams(BaseModel):
    """Endoscope field-of-view estimate (where a control region may be placed)."""

    model_config = ConfigDict(extra="forbid")
    dark_threshold: int = Field(
        40, ge=0, le=255, description="Pixels whose brightest channel is below this and that connect to the "
        "image edge are the black border (outside the field of view).")
    overlay_band_fraction: float = Field(
        0.2, ge=0, le=0.5, description="Width of the outer band (fraction of each side) searched for burned-in "
        "text and overlay graphics.")
    overlay_min_value: int = Field(
        200, ge=0, le=255, description="Overlay/text pixels: at least this bright (HSV value) ...")
    overlay_max_saturation: int = Field(
        100, ge=0, le=255, description="... and at most this saturated (white/grey text), or green-dominant.")
    overlay_dilate_px: int = Field(5, ge=0, description="Grow overlay pixels by this many pixels before excluding.")
    margin_px: int = Field(4, ge=0, description="Erode the field of view by this many pixels (safety margin).")


class CounterfactualParams(BaseModel):
    """Counterfactual normals and matched controls."""

    model_config = ConfigDict(extra="forbid")
    inpainter: Literal["telea", "ns"] = Field(
        "telea", description="Inpainting method: OpenCV Telea (fast marching) or Navier-Stokes.")
    inpaint_radius: int = Field(5, ge=1, description="Neighbourhood radius (px) of cv2.inpaint.")
    margin_fraction: float = Field(
        0.15, ge=0, description="Dilation margin as a fraction of the lesion's equivalent diameter "
        "(2*sqrt(area/pi)), so bigger lesions get a wider margin.")
    margin_min_px: int = Field(3, ge=0, description="Lower bound of the dilation margin in pixels.")
    margin_max_px: int = Field(40, ge=0, description="Upper bound of the dilation margin in pixels.")
    max_area_fraction: float = Field(
        0.5, gt=0, le=1, description="Dilated lesions covering more of the frame than this are excluded "
        "(mask_too_large): inpainting cannot invent that much mucosa.")
    exclude_border_lesions: bool = Field(
        True, description="Exclude lesions whose filled region touches the image edge or leaves the field of "
        "view (lesion_touches_border): the inpainter would pull in black border pixels.")
    require_gt_inside: bool = Field(
        True, description="Exclude a sample when its ground-truth mask is not fully inside the filled region.")
    make_control: bool = Field(True, description="Write a matched control (same fill on lesion-free mucosa).")
    make_both: bool = Field(
        True, description="Also write a 'both' image (lesion removed and control filled) so the number of "
        "filled regions does not predict the label.")
    control_gap_px: int = Field(
        3, ge=0, description="Minimum distance (px) between the control region and the dilated lesion.")
    control_candidates: int = Field(
        48, ge=1, description="Candidate positions tried for the control (lesion positions of other images, "
        "then seeded jitter around them).")
    control_jitter_fraction: float = Field(
        0.15, ge=0, le=1, description="Jitter of candidate positions as a fraction of the image size.")
    ring_px: int = Field(8, ge=1, description="Width of the ring around a filled region used for QC statistics "
                         "and for matching surrounding mucosa.")
    seed: int = Field(0, description="Seed of control placement.")
    fov: FovParams = Field(default_factory=FovParams, description=FovParams.__doc__)
