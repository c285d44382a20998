"""CompiledOrEager: compiled results equal eager ones; a failing compile warns once and falls back."""

from __future__ import annotations

import pytest
import torch

from vitkd.compiling import CompiledOrEager


def test_falls_back_to_eager_with_one_warning() -> None:
    calls = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * x

    wrapped = CompiledOrEager(double, "the doubler")

    def broken(*_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    wrapped._compiled = broken
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match="the doubler failed .no C\\+\\+ compiler"):
        assert torch.equal(wrapped(x), 2 * x)
    assert torch.equal(wrapped(x), 2 * x)  # no second warning: pytest.warns is closed, eager path taken
    assert len(calls) == 2 and wrapped._eager_only
