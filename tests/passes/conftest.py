"""Shared helpers for the pass tests: compile with the nanite backend, compare with fp64."""

from __future__ import annotations

import copy

import pytest
import torch

from nanite_compile.backend import NaniteBackend
from nanite_compile.config import NaniteConfig

FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cache hits or recompile limits across tests)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def _double(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def _first(out):
    """The tensor to compare: the output itself, the first of a tuple, or HF's logits."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    raise TypeError(f"cannot compare {type(out).__name__}")


def _assert_close_to_fp64(module, args, kwargs, got, factor: float = 4.0) -> None:
    """FlexAttention's scheme: the error of ``got`` (fp32) against an fp64 run of ``module``
    must stay within ``factor`` times the fp32 eager run's own error, plus a few ulps."""
    kwargs = kwargs or {}
    mod64 = copy.deepcopy(module).double()
    with torch.no_grad():
        ref = _first(
            mod64(*[_double(a) for a in args], **{k: _double(v) for k, v in kwargs.items()})
        ).double()
        eager = _first(module(*args, **kwargs)).double()
    got = _first(got).double()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    err_eager = (eager - ref).abs().max().item()
    err_got = (got - ref).abs().max().item()
    floor = 8 * FP32_EPS * max(ref.abs().max().item(), 1.0)
    assert err_got <= factor * err_eager + floor, (
        f"compiled error {err_got:.3e} vs eager fp32 error {err_eager:.3e} (floor {floor:.1e})"
    )


def _compile_nanite(
    module,
    *args,
    budget: float = 1.0,
    tile: int = 64,
    dynamic: bool | None = True,
    fullgraph: bool = True,
    **kwargs,
):
    """Compile ``module`` with a fresh nanite backend (eager inner), run it once.

    Returns:
        (backend, output)
    """
    backend = NaniteBackend(NaniteConfig(budget=budget, tile=tile), inner="eager")
    compiled = torch.compile(module, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    return backend, out


@pytest.fixture
def assert_close_to_fp64():
    """``assert_close_to_fp64(module, args, kwargs, got, factor=4.0)``."""
    return _assert_close_to_fp64


@pytest.fixture
def compile_nanite():
    """``compile_nanite(module, *args, budget=1.0, tile=64, dynamic=True, fullgraph=True,
    **kwargs) -> (backend, output)``."""
    return _compile_nanite
