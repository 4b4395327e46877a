"""A stage's view of the params: only what its ``dvc.yaml`` entry declares.

DVC reruns a stage when a param it *declares* changes; a param read but not declared would change
outputs without making the stage stale. :func:`declared_view` wraps :class:`PipelineParams` so that
reading anything outside the declared keys (``contract.STAGES[stage].params``) raises at once, in
every run: the declaration cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class UndeclaredParamError(AttributeError):
    """A stage read a params.yaml key its dvc.yaml entry does not declare."""


class DeclaredParams:
    """Read-only attribute view of a params model restricted to ``declared`` dotted keys.

    A fully declared section is returned as the real model (``params.masks``); a partly declared one
    as another view (``params.privacy`` when only ``privacy.salt`` is declared).
    """

    __slots__ = ("_declared", "_model", "_prefix", "_stage")

    def __init__(self, model: Any, declared: Iterable[str], stage: str, prefix: str = "") -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_declared", tuple(declared))
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        if any(path == d or path.startswith(d + ".") for d in self._declared):
            return getattr(self._model, name)
        if any(d.startswith(path + ".") for d in self._declared):
            return DeclaredParams(getattr(self._model, name), self._declared, self._stage, path + ".")
        raise UndeclaredParamError(
            f"stage {self._stage!r} reads params.yaml key {path!r} but does not declare it: add it to the stage's "
            f"params in dvc.yaml and cogalign_core/contract.py (declared: {', '.join(self._declared) or 'none'})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"stage {self._stage!r}: params are read-only")


def declared_view(params: Any, declared: Iterable[str], stage: str) -> Any:
    """``params`` as seen by ``stage``: only the ``declared`` keys are readable."""
    return DeclaredParams(params, declared, stage)
