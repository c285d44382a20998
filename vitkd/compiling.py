"""``torch.compile`` with an eager fallback, for the hot loops of training."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CompiledOrEager"]


class CompiledOrEager:
    """Call ``torch.compile(fn)``; if compiling fails (no C++ compiler, unsupported op or
    platform), warn once and call ``fn`` eagerly from then on.

    Shapes are static (``dynamic=False``): a training loop calls it with one batch shape.
    One instance belongs to one training run; it is not meant to be shared across threads.
    """

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn = fn
        self.what = what
        self._compiled = torch.compile(fn, dynamic=False)
        self._eager_only = False

    def __call__(self, *args: Any) -> Any:
        if not self._eager_only:
            try:
                return self._compiled(*args)
            except Exception as exc:  # compilation problems surface on the first call
                warnings.warn(f"torch.compile of {self.what} failed ({exc}); using eager PyTorch", stacklevel=2)
                self._eager_only = True
        return self.fn(*args)
