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
    text_min_glyphs: int = Field(
        3, ge=1, description="Bright grey pixels count as burned-in text only in a line of at least this many "
        "separate glyphs; isolated blobs are specular highlights on mucosa, which a control may cover.")
    text_max_line_height_fraction: float = Field(
        0.12, gt=0, le=1, description="A block of text lines is at most this tall (fraction of the frame "
        "height) and at least twice as wide as tall.")
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
        False, description="Exclude every lesion whose filled region touches the image edge or the black border "
        "(lesion_touches_border). Off: the fill is clipped to the lens image and inpainted with the lens edge "
        "replicated outward, so black border pixels never bleed in; only lesions with too little mucosa "
        "around them (min_context_fraction) are excluded.")
    min_context_fraction: float = Field(
        0.35, ge=0, le=1, description="A clipped fill needs at least this share of its outline to border "
        "mucosa (not the frame edge or black border) to be inpainted; below it: lesion_touches_border.")
    require_gt_inside: bool = Field(
        True, description="Exclude a sample when its ground-truth mask is not fully inside the filled region.")
    make_control: bool = Field(True, description="Write a matched control (same fill on lesion-free mucosa).")
    make_both: bool = Field(
        True, description="Also write a 'both' image (lesion removed and control filled) so the number of "
        "filled regions does not predict the label.")
    control_gap_px: int = Field(
        3, ge=0, description="Minimum distance (px) between the control region and the dilated lesion.")
    control_candidates: int = Field(
        48, ge=1, description="Candidate positions tried for the control: the lesion's mirror position, then "
        "seeded draws from the lesion-position prior below (a fixed prior, never other images' lesions, so a "
        "sample's control depends only on that sample, params and code).")
    control_prior_x: float = Field(
        0.54, ge=0, le=1, description="Mean lesion centroid x (fraction of the width) of the position prior; "
        "measured on the Kvasir-SEG + CVC-ClinicDB expert masks (0.54).")
    control_prior_y: float = Field(
        0.54, ge=0, le=1, description="Mean lesion centroid y (fraction of the height) of the position prior (0.54).")
    control_prior_sd: float = Field(
        0.15, ge=0, le=1, description="Standard deviation of the position prior per axis, as a fraction of the "
        "image size (measured 0.15).")
    ring_px: int = Field(8, ge=1, description="Width of the ring around a filled region used for QC statistics "
                         "and for matching surrounding mucosa.")
    seed: int = Field(0, description="Seed of control placement.")
    fov: FovParams = Field(default_factory=FovParams, description=FovParams.__doc__)
