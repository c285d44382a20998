"""``torch.compile`` with an eager fallback, for the hot loops of training."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.exc import TorchDynamoException

__all__ = ["CompiledOrEager"]


def _summary(exc: BaseException) -> str:
    """The first paragraph of a compiler error on one line (dynamo appends pages of debugging hints)."""
    text = str(exc).split("\n\n", 1)[0].replace("\n", " ").strip()
    return text or type(exc).__name__


class CompiledOrEager:
    """Call ``torch.compile(fn)``; if compiling fails (no C++ compiler, unsupported op or
    platform), warn once and call ``fn`` eagerly from then on.

    Only compiling falls back. Dynamo and Inductor report every compile failure (tracing,
    backend, missing compiler; on the first call or on a later recompile for new shapes) as a
    ``torch._dynamo.exc.TorchDynamoException``; ``fn`` is then run eagerly, and if that raises
    too the error is ``fn``'s own and surfaces as itself. Any other exception (an out-of-memory
    error, a failed check inside the compiled graph) propagates unchanged, at the first call or
    the thousandth: it is never retried eagerly.

    Shapes are static (``dynamic=False``): a training loop calls it with one batch shape.
    One instance belongs to one training run; it is not meant to be shared across threads.
    """

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn = fn
        self.what = what
        self._compiled_calls = 0
        self._eager_only = False
        try:
            self._compiled = torch.compile(fn, dynamic=False)
        except RuntimeError as exc:  # torch.compile refuses this platform or Python version outright
            self._fall_back(exc)

    @property
    def compiled_ran(self) -> bool:
        """True once the compiled function has returned a result (the compiled path really ran)."""
        return self._compiled_calls > 0

    @property
    def eager_only(self) -> bool:
        """True once compiling failed and every call runs ``fn`` eagerly."""
        return self._eager_only

    def _fall_back(self, exc: BaseException) -> None:
        warnings.warn(f"torch.compile of {self.what} failed ({_summary(exc)}); using eager PyTorch", stacklevel=3)
        self._eager_only = True

    def __call__(self, *args: Any) -> Any:
        if self._eager_only:
            return self.fn(*args)
        try:
            result = self._compiled(*args)
        except TorchDynamoException as exc:  # compiling failed, not running the compiled code
            result = self.fn(*args)  # raises fn's own error if fn itself is what failed
            self._fall_back(exc)
            return result
        self._compiled_calls += 1
        return result
