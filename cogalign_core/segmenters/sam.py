"""segment-anything (SAM) from box/point prompts: batched image encoding, best-of-multimask decoding.

torch and segment_anything are imported only inside this module, and this module is imported only
when a stage actually uses ``sam``, so the CPU-only default path never loads torch.

The stage refuses to run SAM without a checkpoint (``masks.sam.checkpoint``): random weights give
random masks. Tests and benchmarks build randomly initialised models explicitly and pass them to
:class:`SamSegmenter` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cogalign_core.segmenters.base import Prompt, Prompts, SegmentResult

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

CHECKPOINT_KEY = "masks.sam.checkpoint"


class SamCheckpointError(RuntimeError):
    """SAM was requested without a usable checkpoint."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_sam(model_type: str, checkpoint: str | None, workspace: Path | None = None, device: str = "auto") -> Sam:
    """Build the official SAM architecture ``model_type`` and load ``checkpoint`` (never random weights).

    Raises :class:`SamCheckpointError` naming the params key when the checkpoint is unset or missing.
    """
    if not checkpoint:
        raise SamCheckpointError(
            f"the sam segmenter needs a checkpoint: set `{CHECKPOINT_KEY}` in params.yaml to the path of the "
            f"official SAM {model_type} weights (e.g. sam_vit_b_01ec64.pth); it never runs with random weights")
    path = Path(checkpoint)
    if not path.is_absolute() and workspace is not None:
        path = workspace / path
    if not path.is_file():
        raise SamCheckpointError(f"`{CHECKPOINT_KEY}` = {checkpoint!r}: no such file ({path})")
    from segment_anything import sam_model_registry

    # The architecture only: segment_anything's builder would torch.load the file itself, unguarded.
    model = sam_model_registry[model_type](checkpoint=None)
    load_sam_weights(model, path)
    return model.to(resolve_device(device)).eval()


def load_sam_weights(model: Sam, path: Path) -> None:
    """Load a SAM checkpoint into ``model``: tensors only, every key must match (``strict``).

    ``.safetensors`` files load with safetensors; anything else (the official ``.pth`` files) with
    ``torch.load(weights_only=True)``, which refuses pickled code. Raises :class:`SamCheckpointError`
    naming the file when it is not a plain state dict of this architecture.
    """
    import pickle

    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SamCheckpointError(f"`{CHECKPOINT_KEY}` = {path}: refused, it holds pickled objects besides tensors "
                                 "(loaded with torch.load(weights_only=True)); convert it to a plain state dict or "
                                 "safetensors") from exc
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise SamCheckpointError(f"`{CHECKPOINT_KEY}` = {path}: not a loadable SAM state dict "
                                 f"(tensors only): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                 ) from exc
    if not isinstance(state, dict):
        raise SamCheckpointError(f"`{CHECKPOINT_KEY}` = {path}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SamCheckpointError(f"`{CHECKPOINT_KEY}` = {path}: does not fit the SAM architecture: "
                                 f"{str(exc).splitlines()[0]}") from exc


class SamSegmenter:
    """SAM through ``SamPredictor``: each image encoded once, all its prompts decoded together.

    Images are encoded in batches of ``image_batch_size`` (one encoder forward pass); the per-image
    embedding is then handed to ``SamPredictor`` (the state ``set_torch_image`` would set), and
    ``predict_torch`` decodes every box-only prompt of the image in one call. For each prompt the
    multimask candidate with the highest predicted IoU is kept; the image's mask is the union.
    """

    name = "sam"

    def __init__(self, model: Sam, image_batch_size: int = 8, multimask: bool = True) -> None:
        from segment_anything import SamPredictor

        self.model = model.eval()
        self.predictor = SamPredictor(self.model)
        self.image_batch_size = image_batch_size
        self.multimask = multimask

    @property
    def device(self) -> Any:
        return self.model.device

    def segment(self, image: np.ndarray, prompts: Prompts) -> SegmentResult:
        """One RGB ``(H, W, 3)`` uint8 image; see :meth:`segment_batch`."""
        return self.segment_batch([image], [prompts])[0]

    def segment_batch(self, images: Sequence[np.ndarray], prompts: Sequence[Prompts]) -> list[SegmentResult]:
        """Masks for many images: bool ``(H_i, W_i)`` each, union over that image's prompts.

        ``score`` is the mean predicted IoU of the selected candidates (``None`` without prompts).
        """
        import torch

        if len(images) != len(prompts):
            raise ValueError("one prompt list per image")
        results: list[SegmentResult] = []
        for start in range(0, len(images), self.image_batch_size):
            chunk = list(range(start, min(start + self.image_batch_size, len(images))))
            todo = [i for i in chunk if len(prompts[i]) > 0]
            feats, sizes = self._encode([images[i] for i in todo]) if todo else (None, [])
            by_index = {i: k for k, i in enumerate(todo)}
            for i in chunk:
                h, w = images[i].shape[:2]
                if i not in by_index:
                    results.append(SegmentResult(mask=np.zeros((h, w), dtype=bool)))
                    continue
                k = by_index[i]
                assert feats is not None
                with torch.inference_mode():
                    results.append(self._decode(feats[k:k + 1], sizes[k], (h, w), prompts[i]))
        return results

    def _encode(self, images: Sequence[np.ndarray]) -> tuple[Any, list[tuple[int, int]]]:
        import torch

        transform = self.predictor.transform
        batch, sizes = [], []
        for image in images:
            resized = transform.apply_image(image)  # long side = encoder img_size, uint8 HWC
            t = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
            sizes.append(tuple(t.shape[-2:]))
            batch.append(self.model.preprocess(t.float()))  # normalise + pad to a square
        x = torch.cat(batch, dim=0)
        with torch.inference_mode():
            if x.device.type == "cuda":
                # bf16 autocast: the encoder dominates the cost; the decoder stays in fp32.
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    feats = self.model.image_encoder(x)
                feats = feats.float()
            else:
                feats = self.model.image_encoder(x)
        return feats, sizes

    def _decode(self, feats: Any, input_size: tuple[int, int], original_size: tuple[int, int],
                prompts: Prompts) -> SegmentResult:
        import torch

        p = self.predictor
        p.reset_image()
        # Exactly the state SamPredictor.set_torch_image leaves behind, from the batched encoding.
        p.features, p.input_size, p.original_size, p.is_image_set = feats, input_size, original_size, True
        h, w = original_size
        union = np.zeros((h, w), dtype=bool)
        scores: list[float] = []
        box_only = [q for q in prompts if q.box is not None and not q.points]
        with_points = [q for q in prompts if q.points]
        if box_only:
            boxes = torch.tensor([_box_xyxy(q) for q in box_only], dtype=torch.float32, device=self.device)
            boxes = p.transform.apply_boxes_torch(boxes, original_size)
            masks, ious, _ = p.predict_torch(None, None, boxes=boxes, multimask_output=self.multimask)
            union, scores = _select(masks, ious, union, scores)
        for q in with_points:
            coords = torch.tensor([[[x + 0.5, y + 0.5] for x, y, _ in q.points]], dtype=torch.float32,
                                  device=self.device)
            labels = torch.tensor([[lab for _, _, lab in q.points]], dtype=torch.int64, device=self.device)
            coords = p.transform.apply_coords_torch(coords, original_size)
            box = None
            if q.box is not None:
                box = p.transform.apply_boxes_torch(
                    torch.tensor([_box_xyxy(q)], dtype=torch.float32, device=self.device), original_size)
            masks, ious, _ = p.predict_torch(coords, labels, boxes=box, multimask_output=self.multimask)
            union, scores = _select(masks, ious, union, scores)
        score = float(np.mean(scores)) if scores else None
        return SegmentResult(mask=union, score=score, per_prompt_scores=scores)


def _box_xyxy(prompt: Prompt) -> list[float]:
    # Inclusive pixel box -> continuous corners (the far edge of the last pixel).
    x0, y0, x1, y1 = prompt.box  # type: ignore[misc]
    return [float(x0), float(y0), float(x1 + 1), float(y1 + 1)]


def _select(masks: Any, ious: Any, union: np.ndarray, scores: list[float]) -> tuple[np.ndarray, list[float]]:
    """Keep, per prompt, the candidate with the highest predicted IoU; OR it into ``union``."""
    import torch

    best = torch.argmax(ious, dim=1)  # (B,)
    rows = torch.arange(masks.shape[0], device=masks.device)
    chosen = masks[rows, best]  # (B, H, W) bool
    union = union | chosen.any(dim=0).cpu().numpy()
    scores = scores + [float(v) for v in ious[rows, best].float().cpu()]
    return union, scores


def tiny_random_sam(img_size: int = 64, seed: int = 0) -> Sam:
    """A small randomly initialised SAM (for tests only; its masks mean nothing).

    Built from segment-anything's own modules at ``img_size`` (a multiple of 16), encoder depth 1.
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim, patch = 32, 16
    grid = img_size // patch
    model = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2,
                                      out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=8),
        mask_decoder=MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(depth=2, embedding_dim=dim,
                                                                                    mlp_dim=64, num_heads=2),
                                 num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32),
    )
    return model.eval()
