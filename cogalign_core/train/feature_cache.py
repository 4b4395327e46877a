"""Memoise a frozen vision tower's output per image: the same canvas is encoded once per process.

A frozen tower (no trainable tensor, BatchNorm frozen: :func:`cogalign_core.train.modeling.freeze_vision_tower`)
is a pure function of its input, yet training and evaluation feed it the same images again and
again: every SFT epoch, the ``num_generations`` copies of each GRPO prompt (for generation, the
policy and the reference model), and every arm evaluated on the same test images. On a CPU the
tower is most of a step's cost, so :func:`cached_tower` swaps the tower instance's ``forward`` for
one that looks each image up by a digest of its pixel tensor and runs the tower only on misses.

The swap is on the instance, not the class, and is undone on exit, so weights, ``state_dict`` and
``save_pretrained`` are untouched; the cached output is the tower's own output for that image
(computed in a smaller batch, which a CNN in eval mode does not depend on beyond float rounding).
Keys include a digest of the tower's tensors, so one cache may serve several models only where
their towers are bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from cogalign_core.train.modeling import vision_tower

DEFAULT_MAX_ENTRIES = 8192  # 1280 x 7 x 7 float32 features: about 2 GiB at most


class FeatureCache:
    """LRU map ``(tower digest, image digest) -> last_hidden_state`` of one image (C, H', W')."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def tensor_digest(t: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and bytes (CPU copy; contiguous)."""
    a = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype}{tuple(a.shape)}".encode())
    h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Digest of every parameter and buffer of ``module`` (names included)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def is_frozen(module: torch.nn.Module) -> bool:
    """True when no parameter trains and no BatchNorm would update running statistics in train mode."""
    if any(p.requires_grad for p in module.parameters()):
        return False
    return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


@contextlib.contextmanager
def cached_tower(model: Any, cache: FeatureCache | None = None) -> Iterator[FeatureCache]:
    """Within the block, the model's vision tower encodes each distinct image once (see module doc).

    Args:
        model: a vision-language model whose tower (:func:`vision_tower`) is frozen and returns
            ``last_hidden_state`` of shape (B, C, H', W') (timm CNN) — Qwen-VL's ViT takes packed
            patches instead and is left alone (the block then caches nothing).
        cache: share a cache across models (their tower digests keep entries apart).
    Raises:
        ValueError: if the tower is not frozen (caching would then be wrong).
    """
    cache = cache if cache is not None else FeatureCache()
    tower = vision_tower(model)
    if type(tower).__name__ != "TimmWrapperModel":
        yield cache
        return
    if not is_frozen(tower):
        raise ValueError("cached_tower needs a frozen tower (freeze_vision_tower first): a training tower's "
                         "outputs change every step")
    tower_key = module_digest(tower)
    original = tower.forward

    def forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        keys = [(tower_key, tensor_digest(img)) for img in pixel_values]
        todo: dict[tuple[str, str], int] = {}  # distinct uncached images -> first row holding them
        for i, k in enumerate(keys):
            if k not in todo and cache.get(k) is None:
                todo[k] = i
        cache.hits += len(keys) - len(todo)
        cache.misses += len(todo)
        if todo:
            rows = list(todo.values())
            with torch.no_grad():
                out = original(pixel_values[rows], *args, **{**kwargs, "return_dict": True})
            for j, k in enumerate(todo):
                cache.put(k, out.last_hidden_state[j].detach().clone())
        features = torch.stack([cache.get(k) for k in keys])  # type: ignore[misc]
        return BaseModelOutputWithPooling(last_hidden_state=features.to(pixel_values.device))

    tower.forward = forward
    try:
        yield cache
    finally:
        del tower.forward  # back to the class's forward
