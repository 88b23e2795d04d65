"""``select="query"``: each query reads its own exact tiles (levels.build_query_selection).

The contract: every query keeps its row's fixed tiles (near field, anchors) and
at most its row's allowance of key reads; what it reads depends on nothing after
it; the output is exact softmax attention over exactly the keys it kept (checked
against a dense masked SDPA in fp64, for the reference arithmetic and the CPU path).
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from nanite_compile.kernels import cpu
from nanite_compile.kernels.levels import (
    EXACT,
    NONE,
    TileParams,
    _allowance,
    build_query_selection,
    query_tile_mass,
)
from nanite_compile.kernels.reference import (
    exact_attention,
    tiled_attention,
    tiled_attention_from_levels,
)


def _params(budget=0.3, tile=16, window=2, anchors=1, **kw):
    return TileParams(tile=tile, window=window, anchors=anchors, horizon=None, budget=budget,
                      budget_reads=None, state_features=0, select="query", **kw)


def _inputs(b, h, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * 2.0
    v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    return q, k, v


def _selection(q, k, valid, p, scale):
    """The driver's steps for a causal self-attention call, kept in the open."""
    b, h, n, d = q.shape
    T = p.tile
    mk = -(-n // T)
    validp = torch.nn.functional.pad(valid, (0, mk * T - n), value=False)
    kc = torch.nn.functional.pad(k, (0, 0, 0, mk * T - n))
    mass = query_tile_mass(q, kc, validp, T, scale, True, n)
    qv = torch.zeros(mk * T, dtype=torch.bool)
    qv[:n] = True
    levels, keep = build_query_selection(
        mass, torch.arange(mk), p, causal=True, window=None,
        tile_valid=validp.reshape(b, mk, T).any(-1), query_valid=qv.reshape(mk, T))
    return mass, levels, keep


@pytest.mark.parametrize("b,h,hkv,n,pad", [(1, 6, 2, 300, False), (2, 4, 4, 257, True),
                                           (1, 3, 1, 512, False)])
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_output_is_softmax_over_the_kept_keys(b, h, hkv, n, pad, impl):
    q, k, v = _inputs(b, h, hkv, n, 16, seed=n)
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad:
        valid[-1, :37] = False  # left padding of the last batch row
    p = _params()
    scale = 0.25
    _, levels, keep = _selection(q, k, valid, p, scale)
    T, G = p.tile, h // hkv
    # dense mask: causal, valid, and the key's tile among the query's own
    pos = torch.arange(n)
    tile_of_key = pos // T
    kq = keep.reshape(b, hkv, -1, keep.shape[-1])[:, :, :n]  # [B, Hkv, N, mk] by query position
    allowed = kq.gather(-1, tile_of_key.expand(b, hkv, n, n))  # [B, Hkv, Nq, Nk]
    allowed = allowed & (pos[None, :] <= pos[:, None]) & valid[:, None, None, :]
    dense = exact_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                            allowed.repeat_interleave(G, 1), scale, False)
    dense = dense.nan_to_num(0.0)  # a query that sees nothing (left padding) reads 0
    run = cpu.run if impl == "cpu" else tiled_attention_from_levels
    out = run(q, k, v, levels, scale=scale, causal=True, tile=T,
              key_valid=valid if pad else None, query_keep=keep)
    rows = valid[:, None, :, None].expand_as(out)  # padded queries: no defined output
    assert (out - dense).abs().masked_select(rows).max() < 1e-12
    # the driver gives the same (it makes the same selection)
    am = None
    if pad:
        am = (pos[None, :] <= pos[:, None])[None, None] & valid[:, None, None, :]
    st: dict = {}
    drv = tiled_attention(q, k, v, am, scale=scale, is_causal=am is None, params=p, stats=st,
                          fast=cpu if impl == "cpu" else None)
    assert st["path"] == "tiled" and st["impl"] == impl
    assert (drv - dense).abs().masked_select(rows).max() < 1e-12


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6])
def test_each_query_reads_its_fixed_tiles_and_at_most_its_allowance(budget):
    b, h, hkv, n = 1, 6, 2, 640
    q, k, v = _inputs(b, h, hkv, n, 16, seed=3)
    p = _params(budget=budget)
    T = p.tile
    valid = torch.ones(b, n, dtype=torch.bool)
    _, levels, keep = _selection(q, k, valid, p, 0.25)
    mk = n // T
    j = torch.arange(mk)
    exact = ((j + 1) * T).double()[None, None]
    n_fixed = torch.minimum(j + 1, torch.tensor(p.window)) + \
        (j + 1 - p.window).clamp(min=0).clamp(max=p.anchors)
    allow = _allowance(exact, n_fixed.double()[None, None] * T, budget)[0, 0]  # [mq]
    reads = keep.sum(-1).double() * T  # [B, Hkv, mq, T]
    assert bool((reads <= allow[None, None, :, None] + 1e-9).all())
    # spent: within one tile of the allowance wherever the row has tiles left to add
    visible = (j[None, :] <= j[:, None]).sum(-1).double() * T
    full = torch.minimum(allow, visible)
    assert bool((reads >= full[None, None, :, None] - T).all())
    # fixed tiles (near field, anchors) for every query; nothing above the diagonal
    ki = torch.arange(mk)
    near = (j[:, None] - ki[None, :] >= 0) & (j[:, None] - ki[None, :] < p.window)
    anchor = (ki[None, :] < p.anchors) & (ki[None, :] <= j[:, None])
    assert bool(keep[..., (near | anchor)[:, None, :].expand(mk, T, mk)].all())
    assert not bool(keep[..., (ki[None, :] > j[:, None])[:, None, :].expand(mk, T, mk)].any())
    # the table is the union of the queries' tiles
    assert torch.equal(levels == EXACT, keep.any(3))
    assert bool(((levels == EXACT) | (levels == NONE)).all())
    # the budget holds on average too (counted as the op reports it)
    st: dict = {}
    tiled_attention(q, k, v, None, scale=0.25, is_causal=True, params=p, stats=st)
    assert st["reads_per_query"] <= budget * st["exact_reads_per_query"] + T
    assert st["computed_per_query"] >= st["reads_per_query"]


def test_a_query_reads_the_tile_it_attends_to():
    """A middle tile whose keys point along one query's direction is that query's pick,
    while its neighbours in the same row, pointing elsewhere, leave it out."""
    b, h, hkv, n, d, T = 1, 2, 1, 512, 8, 16
    g = torch.Generator().manual_seed(0)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * 0.1
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 0.1
    e0 = torch.zeros(d, dtype=torch.float64)
    e0[0] = 1.0
    k[0, 0, 5 * T:6 * T] = 8.0 * e0  # tile 5 answers direction e0
    q[..., 0] = -q[..., 0].abs() - 0.5  # every other query turns away from it
    qpos = 25 * T + 7  # row 25: tile 5 is in its middle (window 2, anchors 1)
    q[0, :, qpos] = 8.0 * e0
    p = _params(budget=0.3, tile=T)  # 3 middle tiles a query
    _, levels, keep = _selection(q, k, torch.ones(b, n, dtype=torch.bool), p, 1.0)
    assert bool(keep[0, 0, 25, 7, 5])
    assert int(keep[0, 0, 25, :, 5].sum()) == 1  # only that query reads it
    assert int(levels[0, 0, 25, 5]) == EXACT


def test_no_output_depends_on_a_later_token():
    b, h, hkv, n, d = 1, 4, 2, 400, 16
    q, k, v = _inputs(b, h, hkv, n, d, seed=7)
    p = _params(budget=0.25)
    out = tiled_attention(q, k, v, None, scale=0.25, is_causal=True, params=p, fast=cpu)
    for cut in (100, 233, 351):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(cut)
        q2[:, :, cut:] = torch.randn(q2[:, :, cut:].shape, generator=g, dtype=torch.float64)
        k2[:, :, cut:] = torch.randn(k2[:, :, cut:].shape, generator=g, dtype=torch.float64) * 5
        v2[:, :, cut:] = torch.randn(v2[:, :, cut:].shape, generator=g, dtype=torch.float64)
        out2 = tiled_attention(q2, k2, v2, None, scale=0.25, is_causal=True, params=p, fast=cpu)
        assert torch.equal(out[:, :, :cut], out2[:, :, :cut]), cut


def test_query_mass_rows_are_distributions_over_earlier_tiles():
    b, h, hkv, n, d, T = 2, 6, 3, 256, 8, 16
    q, k, _ = _inputs(b, h, hkv, n, d, seed=1)
    valid = torch.ones(b, n, dtype=torch.bool)
    mass = query_tile_mass(q, k, valid, T, 0.3, True, n)
    mk = n // T
    assert mass.shape == (b, hkv, mk, T, mk)
    j = torch.arange(mk)
    later = (j[None, :] >= j[:, None])[None, None, :, None, :].expand_as(mass)
    assert bool((mass.masked_select(later) == 0).all())  # own tile and after: not scored
    sums = mass.sum(-1)[:, :, 1:]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert bool((mass[:, :, 0] == 0).all())  # the first tile has nothing before it


def test_the_triton_kernel_is_not_asked_for_a_per_query_selection():
    """A fast module without per-query support is passed over; asked for explicitly
    (impl='triton'), the error names the option and the way out."""
    q, k, v = _inputs(1, 2, 1, 256, 8, seed=2)
    called = []
    fake = types.SimpleNamespace(__name__="triton_attn", supports=lambda *a: True,
                                 run=lambda *a, **kw: called.append(1))
    st: dict = {}
    out = tiled_attention(q, k, v, None, scale=0.3, is_causal=True, params=_params(), stats=st,
                          fast=fake)
    assert not called and st["impl"] == "reference" and bool(torch.isfinite(out).all())
    with pytest.raises(RuntimeError, match="select='query'.*impl='auto'"):
        tiled_attention(q, k, v, None, scale=0.3, is_causal=True, params=_params(), fast=fake,
                        require_fast=True)


def test_query_keep_needs_an_exact_table():
    q, k, v = _inputs(1, 2, 1, 64, 8, seed=4)
    levels = torch.full((1, 1, 4, 4), EXACT, dtype=torch.int8).tril().masked_fill(
        torch.ones(4, 4, dtype=torch.bool).triu(1), NONE)
    levels[0, 0, 3, 0] = 1  # a pooled tile
    keep = torch.ones(1, 1, 4, 16, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="EXACT and NONE"):
        tiled_attention_from_levels(q, k, v, levels, scale=0.3, causal=True, tile=16,
                                    query_keep=keep)
    with pytest.raises(ValueError, match=r"\[B, Hkv, mq, T, mk\]"):
        cpu.run(q, k, v, levels.clamp(max=0), scale=0.3, causal=True, tile=16,
                query_keep=keep[..., :3])


def test_select_is_validated():
    with pytest.raises(ValueError, match="select must be one of"):
        TileParams(tile=16, window=2, anchors=1, horizon=None, budget=0.3, budget_reads=None,
                   state_features=0, select="token")
    assert math.isfinite(_params().budget)


def test_the_op_differentiates_through_the_selection():
    """Gradients of the op with select="query" equal those of dense attention masked to
    the keys each query kept (the selection is held fixed, as the row rule's table is)."""
    b, h, hkv, n, d = 1, 4, 2, 256, 8
    q, k, v = _inputs(b, h, hkv, n, d, seed=11)
    p = _params(budget=0.3)
    scale = 0.3
    _, _, keep = _selection(q, k, torch.ones(b, n, dtype=torch.bool), p, scale)
    pos = torch.arange(n)
    kq = keep.reshape(b, hkv, -1, keep.shape[-1])[:, :, :n]
    allowed = kq.gather(-1, (pos // p.tile).expand(b, hkv, n, n)) & (pos[None, :] <= pos[:, None])
    G = h // hkv
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = torch.ops.nanite.tiled_attention(qs, ks, vs, None, scale, True, p.tile, p.window,
                                           p.anchors, -1, p.budget, 0, 0, 0, "grad_site",
                                           p.sharpness, "torch", -1, "query")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (qs, ks, vs))
    qd, kd, vd = (t.clone().requires_grad_(True) for t in (q, k, v))
    dense = exact_attention(qd, kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1),
                            allowed.repeat_interleave(G, 1), scale, False)
    assert (out.detach() - dense.detach()).abs().max() < 1e-12
    want = torch.autograd.grad((dense * w).sum(), (qd, kd, vd))
    for got, ref in zip(grads, want, strict=True):
        assert (got - ref).abs().max() < 1e-10


def test_the_cost_models_reuse_keeps_the_per_query_estimate():
    """The cost model's ladder reuses the budget-independent estimate between budgets:
    the per-query one under its own key, with the same outputs as fresh calls."""
    q, k, v = _inputs(1, 4, 2, 320, 8, seed=9)
    reuse: dict = {}
    for budget in (0.3, 0.6):
        p = _params(budget=budget)
        fresh = tiled_attention(q, k, v, None, scale=0.3, is_causal=True, params=p, fast=cpu)
        again = tiled_attention(q, k, v, None, scale=0.3, is_causal=True, params=p, fast=cpu,
                                reuse=reuse)
        assert torch.equal(fresh, again)
    assert list(reuse) == [(16, True, "query", None)]
    row = tiled_attention(q, k, v, None, scale=0.3, is_causal=True, reuse=reuse, fast=cpu,
                          params=TileParams(tile=16, window=2, anchors=1, horizon=None,
                                            budget=0.3, budget_reads=None, state_features=0))
    assert len(reuse) == 2 and bool(torch.isfinite(row).all())


def test_one_query_at_the_end_reads_its_own_tiles():
    """A single query (decoding without the bounded cache): its row is itself, so the
    table is its selection and the output is softmax over those tiles' keys."""
    q, k, v = _inputs(1, 4, 2, 300, 16, seed=5)
    st: dict = {}
    out = tiled_attention(q[:, :, -1:], k, v, None, scale=0.25, is_causal=False,
                          params=_params(budget=0.3), fast=cpu, stats=st)
    assert st["path"] == "tiled" and st["reads_per_query"] == st["computed_per_query"]
    assert st["reads_per_query"] <= 0.3 * 300 + 16
    tiles = st["levels"][0, :, 0] == EXACT  # [Hkv, mk]
    allowed = tiles[:, torch.arange(300) // 16][None, :, None, :]  # [1, Hkv, 1, Nk]
    dense = exact_attention(q[:, :, -1:], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                            allowed.repeat_interleave(2, 1), 0.25, False)
    assert (out - dense).abs().max() < 1e-12
