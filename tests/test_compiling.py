"""CompiledOrEager: compiled results equal eager ones; only a failing compile falls back (warning once);
an error raised while running the compiled code, on any call, surfaces as itself and is never retried eagerly."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from vitkd.compiling import CompiledOrEager

pytestmark = pytest.mark.timeout(120)


class Spy:
    """Wraps the eager function: counts how often the eager path runs."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _cholesky_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(x).sum() * 2


def _matmul_sin(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y).sin()


def _spd(seed: int) -> torch.Tensor:
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))
    return a @ a.T + 4 * torch.eye(4)


def test_compiled_path_runs_and_matches_eager() -> None:
    wrapped = CompiledOrEager(_cholesky_sum, "the cholesky")
    wrapped.fn = spy = Spy(_cholesky_sum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails the test
        for seed in range(3):
            x = _spd(seed)
            torch.testing.assert_close(wrapped(x), torch.linalg.cholesky(x).sum() * 2)
    assert wrapped.compiled_ran and not wrapped.eager_only and spy.calls == 0


def test_runtime_error_on_third_call_propagates_without_eager_retry() -> None:
    """A failed check inside the compiled graph (not positive-definite) on call 3 is the caller's error."""
    wrapped = CompiledOrEager(_cholesky_sum, "the cholesky")
    wrapped.fn = spy = Spy(_cholesky_sum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(_spd(0))
        wrapped(_spd(1))
        with pytest.raises(torch.linalg.LinAlgError, match="positive-definite"):
            wrapped(-torch.eye(4))
        torch.testing.assert_close(wrapped(_spd(2)), _cholesky_sum(_spd(2)))  # still the compiled path
    assert spy.calls == 0 and wrapped.compiled_ran and not wrapped.eager_only


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CPU out of memory"), RuntimeError("step 5000")])
@pytest.mark.parametrize("failing_call", [1, 3])
def test_any_non_compile_error_propagates_as_itself(error: Exception, failing_call: int) -> None:
    wrapped = CompiledOrEager(_cholesky_sum, "the cholesky")
    wrapped.fn = spy = Spy(_cholesky_sum)
    calls = []

    def compiled(x: torch.Tensor) -> torch.Tensor:  # stands in for the compiled graph
        calls.append(x)
        if len(calls) == failing_call:
            raise error
        return x.sum()

    wrapped._compiled = compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(failing_call - 1):
            wrapped(_spd(0))
        with pytest.raises(type(error)) as caught:
            wrapped(_spd(0))
    assert caught.value is error and spy.calls == 0 and not wrapped.eager_only
    assert wrapped.compiled_ran == (failing_call > 1)


def test_compile_failure_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that cannot compile (what a missing C++ compiler looks like to dynamo): eager, warned once."""

    def broken_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    wrapped = CompiledOrEager(_matmul_sin, "the matmul")
    wrapped.fn = spy = Spy(_matmul_sin)
    x, y = torch.randn(2, 3), torch.randn(3, 2)
    with pytest.warns(UserWarning, match=r"torch.compile of the matmul failed \(.*no C\+\+ compiler") as record:
        torch.testing.assert_close(wrapped(x, y), (x @ y).sin())
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(wrapped(x, y), (x @ y).sin())
    assert spy.calls == 2 and wrapped.eager_only and not wrapped.compiled_ran


def test_error_found_while_tracing_surfaces_as_the_functions_own() -> None:
    """Dynamo wraps a shape error met while tracing; the eager retry raises it as PyTorch would, unwarned."""
    wrapped = CompiledOrEager(_matmul_sin, "the matmul")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="same reduction dim|shapes cannot be multiplied") as caught:
            wrapped(torch.ones(2, 3), torch.ones(4, 2))
    assert not isinstance(caught.value, torch._dynamo.exc.TorchDynamoException)
    assert not wrapped.eager_only
