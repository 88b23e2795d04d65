"""The Triton kernels around the forward kernel, each against its PyTorch counterpart:
the level rule's mass estimate (``kernels/triton_mass.py`` against
``levels.tile_importance``), the pyramid bank (``triton_pyramid.py`` against
``reference._pyramid``) and the state's per-tile sums (``triton_state.py`` against
the same sums from ``reference._log_features``).

Without CUDA the kernels run under the Triton interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton is imported); with CUDA they run compiled.
The PyTorch computation in fp64 is the golden result: a kernel's error must stay
within 4x that of the PyTorch computation in fp32, plus a few ulps.
"""

from __future__ import annotations

import pytest
import torch
from triton_marks import DEV, TRITON_MARKS

from nanite_compile.kernels import levels, triton_attn, triton_mass, triton_pyramid, triton_state
from nanite_compile.kernels.levels import TileParams, tile_importance
from nanite_compile.kernels.reference import (
    _pyramid,
    random_features,
    state_tiles,
    tiled_attention,
)

pytestmark = TRITON_MARKS


# ---------------------------------------------------------------------------
# the mass estimate


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
    base = tile_importance(q, kc, valid, dtype=torch.float32, **kw)  # as the kernel scores
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
    kernel, and the plan (the level table) is the one the PyTorch estimate gives (in
    float32, as the kernel scores: a CPU with native bf16 estimates in bf16)."""
    monkeypatch.setattr(levels, "estimate_dtype", lambda q: torch.float32)
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


# ---------------------------------------------------------------------------
# the pyramid bank


@pytest.mark.parametrize("b, hkv, n, d, dv, tile, pad", [
    (1, 2, 128, 16, 16, 16, None),
    (2, 3, 96, 24, 40, 8, "left"),  # head widths that are not powers of two, padding
    (2, 1, 64, 16, 16, 32, "holes"),  # padding inside tiles, a whole tile padded
    (1, 1, 16, 16, 8, 2, None),  # tile 2: one level above the keys
])
def test_pyramid_kernel_matches_the_pytorch_bank(b, hkv, n, d, dv, tile, pad):
    g = torch.Generator().manual_seed(n + d)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, dv, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad == "left":
        valid[-1, : n // 3 + 1] = False
    elif pad == "holes":
        valid[0, 3:7] = False
        valid[-1, tile:2 * tile] = False
    bk, bv, blc, offs = triton_pyramid.pyramid_triton(k.to(DEV), v.to(DEV), valid.to(DEV), tile)
    gk, gv, glc, _, goffs = _pyramid(k.double(), v.double(), valid, tile)
    rk, rv, rlc, _, _ = _pyramid(k, v, valid, tile)
    assert offs.cpu().tolist() == goffs.tolist()
    assert torch.equal(torch.isinf(blc.cpu()), torch.isinf(glc))
    for out, gold, ref in ((bk, gk, rk), (bv, gv, rv), (blc, glc, rlc)):
        out = out.cpu()
        assert out.shape == gold.shape and out.dtype == torch.float32
        fin = torch.isfinite(gold)
        err = (out.double() - gold)[fin].abs().max().item()
        base = (ref.double() - gold)[fin].abs().max().item()
        assert err <= 4 * base + 4 * torch.finfo(torch.float32).eps, (err, base)


def test_pyramid_kernel_rejects_a_bad_tile():
    k = torch.zeros(1, 1, 48, 16)
    with pytest.raises(ValueError, match="power of two dividing N"):
        triton_pyramid.pyramid_triton(k, k, torch.ones(1, 48, dtype=torch.bool), 32)


# ---------------------------------------------------------------------------
# the state's per-tile sums


@pytest.mark.parametrize("b, hkv, n, d, dv, f, tile, pad", [
    (1, 2, 128, 16, 16, 32, 16, None),
    (2, 3, 96, 24, 40, 20, 8, "left"),  # widths that are not powers of two, padding
    (2, 1, 64, 16, 16, 16, 32, "all"),  # one batch row with no valid key at all
])
def test_state_tiles_match_the_pytorch_sums(b, hkv, n, d, dv, f, tile, pad):
    g = torch.Generator().manual_seed(n + f)
    k = torch.randn(b, hkv, n, d, generator=g) * 0.7
    v = torch.randn(b, hkv, n, dv, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad == "left":
        valid[-1, : n // 3 + 1] = False
    elif pad == "all":
        valid[-1] = False
    proj = random_features(d, f, hkv, seed=1, device="cpu", dtype=torch.float32)
    s = d**-0.5
    out = triton_state.state_tiles_triton(k.to(DEV), v.to(DEV), valid.to(DEV), proj.to(DEV),
                                          s, tile)
    gold = state_tiles(k.double(), v.double(), valid, proj.double(), s, tile)
    ref = state_tiles(k, v, valid, proj, s, tile)
    for o, gd, r in zip(out, gold, ref, strict=True):
        o = o.cpu()
        assert o.shape == gd.shape and o.dtype == torch.float32
        err = (o.double() - gd).abs().max().item()
        base = (r.double() - gd).abs().max().item()
        eps = torch.finfo(torch.float32).eps
        assert err <= 4 * base + 4 * eps * max(1.0, gd.abs().max().item()), (err, base)
    if pad == "all":  # nothing to fold: zero sums, the stabiliser's floor
        assert bool((out[0][-1] == 0).all()) and bool((out[1][-1] == 0).all())
        assert bool((out[2][-1].cpu() == -1e30).all())
