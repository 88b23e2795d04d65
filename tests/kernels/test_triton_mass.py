"""The Triton mass estimate (``kernels/triton_mass.py``) against ``levels.tile_importance``.

Without CUDA the kernel runs under the Triton interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton is imported); with CUDA it runs compiled.
The PyTorch estimate in fp64 is the golden result: the kernel's error must stay
within 4x that of the PyTorch estimate in fp32, plus a few ulps.
"""

from __future__ import annotations

import os

import pytest
import torch

from nanite_compile.kernels import levels, triton_attn, triton_mass
from nanite_compile.kernels.levels import TileParams, tile_importance
from nanite_compile.kernels.reference import tiled_attention

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.skipif(not triton_attn.available(), reason="triton is not installed"),
    pytest.mark.skipif(
        not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
        reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set "
        "(run the kernel tests as their own pytest process, or set it in the environment)",
    ),
]


def inputs(b, h, hkv, n, d, tile, seed, nq=None, pad=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    k[:, :, 5] *= 4.0  # a key that draws mass: the estimate is not flat
    if nq is not None:
        q = q[:, :, n - nq:]
    mk = -(-n // tile)
    kc = torch.nn.functional.pad(k, (0, 0, 0, mk * tile - n))
    valid = torch.ones(b, mk * tile, dtype=torch.bool)
    valid[:, n:] = False
    if pad == "left":
        valid[-1, : n // 3 + 1] = False
    elif pad == "right":
        valid[-1, n - n // 3 - 1: n] = False
    return q, kc, valid


def both(q, kc, valid, tile, causal, nk, stride, means):
    kw = dict(tile=tile, scale=q.shape[-1] ** -0.5, causal=causal, nk=nk, stride=stride,
              means=means)
    out = triton_mass.tile_importance_triton(q.to(DEV), kc.to(DEV), valid.to(DEV), **kw).cpu()
    golden = tile_importance(q.double(), kc.double(), valid, **kw)
    base = tile_importance(q, kc, valid, **kw)
    return out, golden, base


def assert_golden(out, golden, base):
    assert out.dtype == torch.float32 and out.shape == golden.shape
    assert bool(torch.isfinite(out).all())
    err = (out.double() - golden).abs().max().item()
    ref = (base.double() - golden).abs().max().item()
    assert err <= 4 * ref + 4 * torch.finfo(torch.float32).eps, f"{err:.3e} vs {ref:.3e}"


@pytest.mark.parametrize(
    "b, h, hkv, n, tile, causal, stride, means, nq, pad",
    [
        (1, 4, 2, 160, 16, True, 4, 4, None, None),  # GQA, sampled queries, 4 means
        (2, 3, 1, 200, 16, True, 1, 2, None, "left"),  # every query, padding, odd length
        (2, 6, 3, 150, 8, True, 2, 8, None, "right"),  # one mean per key (E = T)
        (1, 2, 2, 130, 16, False, 4, 4, None, None),  # bidirectional: every tile visible
        (2, 4, 2, 171, 16, True, 4, 4, 1, "left"),  # one query at the end (decode)
    ],
)
def test_mass_kernel_matches_the_pytorch_estimate(b, h, hkv, n, tile, causal, stride, means,
                                                  nq, pad):
    """Same rows, same masses: sampled queries, the causal rule (a row from the tile
    before it and its own first query), key padding, GQA, one query, bidirectional."""
    q, kc, valid = inputs(b, h, hkv, n, 16, tile, seed=n, nq=nq, pad=pad)
    out, golden, base = both(q, kc, valid, tile, causal, n, stride, means)
    assert_golden(out, golden, base)
    # rows see only what lies before them: nothing at or past a row's own tile (causal,
    # several queries), and every row that sees something sums to about 1
    if causal and nq is None:
        mq = out.shape[2]
        above = torch.ones(mq, mq, dtype=torch.bool).triu(0)
        assert bool((out[..., above] == 0).all())
    sums = out.sum(-1)
    assert bool(((sums < 1e-6) | ((sums - 1).abs() < 1e-4)).all())


def test_the_op_uses_the_kernel_where_triton_runs(monkeypatch):
    """With the Triton path in use the level rule takes its mass estimate from the
    kernel, and the plan (the level table) is the one the PyTorch estimate gives."""
    q, kc, valid = inputs(1, 4, 2, 256, 16, 16, seed=3)
    k = kc[:, :, :256].to(DEV)
    v = torch.randn(1, 2, 256, 16).to(DEV)
    q = q.to(DEV)
    params = TileParams(tile=16, window=2, anchors=1, horizon=None, budget=0.4,
                        budget_reads=None, state_features=0)
    calls = []
    real = triton_mass.tile_importance_triton
    monkeypatch.setattr(triton_attn, "importance",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    stats_t, stats_p = {}, {}
    tiled_attention(q, k, v, None, scale=0.25, is_causal=True, params=params,
                    fast=triton_attn, stats=stats_t)
    assert calls, "the Triton estimate did not run"
    tiled_attention(q.cpu(), k.cpu(), v.cpu(), None, scale=0.25, is_causal=True,
                    params=params, stats=stats_p)
    assert torch.equal(stats_t["levels"].cpu(), stats_p["levels"])
    assert levels.tile_importance is tile_importance  # the PyTorch estimate untouched
