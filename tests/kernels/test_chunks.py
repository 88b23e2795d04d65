"""A causal query block shorter than its keys: a chunk continuing a cache.

Chunked prefill, a second turn of a conversation on the cache of the first and
assisted decoding hand the attention the last ``Nq`` queries against all ``Nk``
keys (1 < Nq < Nk) under a bottom-right causal mask. The operator runs them
tiled: the level table has the rows of the chunk's query tiles, the budget is
shared over those rows, and no output depends on a later token.
"""

from __future__ import annotations

import math

import pytest
import torch

from nanite_compile.kernels import cpu
from nanite_compile.kernels.levels import STATE, TileParams
from nanite_compile.kernels.masks import structured_allowed
from nanite_compile.kernels.reference import (
    exact_attention,
    random_features,
    tiled_attention,
    tiled_attention_from_levels,
)

IMPLS = {"reference": None, "cpu": cpu}


def _qkv(b, h, hkv, n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype) * 1.5
    k = torch.randn(b, hkv, n, d, generator=g, dtype=dtype) * torch.rand(
        b, hkv, n, 1, generator=g, dtype=dtype) * 3
    v = torch.randn(b, hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


def _chunk_mask(nq, nk, key_valid=None):
    """The bottom-right causal mask a decoder builds for ``nq`` new tokens after ``nk - nq``."""
    return structured_allowed(nq, nk, True, None, key_valid, torch.device("cpu"))[:, None]


def _params(budget=0.25, reads=None, sharpness=0.0, features=0, select="row", row_tiles=1):
    return TileParams(tile=16, window=2, anchors=1, horizon=None, budget=budget,
                      budget_reads=reads, state_features=features, sharpness=sharpness,
                      select=select, row_tiles=row_tiles)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sharpness", [0.0, 6.0])
@pytest.mark.parametrize("row_tiles", [1, 2])
def test_chunk_rows_are_the_one_pass_rows(impl, sharpness, row_tiles):
    """With a per-query read allowance (``budget_reads``) each row's plan depends only on
    the tokens before its tile, so a tile-aligned chunk computes the rows the whole
    sequence in one pass computes for it: all of them under the density rule; all but
    its first tile under the mass estimate, whose first row is estimated from the
    chunk's first query alone (the queries of the tile before it are not there)."""
    n, nq, T = 640, 160, 16
    q, k, v = _qkv(1, 6, 2, n, 16, seed=1)
    p = _params(budget=1.0, reads=72, sharpness=sharpness, features=8, row_tiles=row_tiles)
    fast = IMPLS[impl]
    st_full, st = {}, {}
    full = tiled_attention(q, k, v, None, scale=0.25, is_causal=True, params=p, fast=fast,
                           stats=st_full)
    part = tiled_attention(q[:, :, n - nq:], k, v, _chunk_mask(nq, n), scale=0.25,
                           is_causal=False, params=p, fast=fast, stats=st)
    assert st["path"] == "tiled" and st["mask"] == "causal"
    assert bool((st["levels"] == STATE).any()) and bool((st["levels"] > 0).any())
    skip = 0 if sharpness == 0 else 2 * T  # the first row (a pair's with row_tiles 2)
    rows = st_full["levels"][:, :, (n - nq) // T:]
    first = skip // T
    assert torch.equal(st["levels"][:, :, first:], rows[:, :, first:])
    torch.testing.assert_close(part[:, :, skip:], full[:, :, n - nq + skip:],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("select", ["row", "query"])
@pytest.mark.parametrize("start", [384, 390])  # on a tile edge, inside a tile
def test_chunk_is_causal(impl, select, start):
    """Changing the chunk's tokens after position ``p`` (their queries, keys and values)
    leaves the outputs up to ``p`` as they were: bit for bit (to an ulp where each
    query selects its own tiles)."""
    n = 600
    q, k, v = _qkv(2, 6, 2, n, 16, seed=2)
    p = _params(budget=0.2, sharpness=6.0, features=0 if select == "query" else 8,
                select=select)
    mask = _chunk_mask(n - start, n)
    cut = 500  # positions >= cut change
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(5)
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.randn(x[:, :, cut:].shape, generator=g, dtype=x.dtype) * 3
    st = {}
    a = tiled_attention(q[:, :, start:], k, v, mask, scale=0.25, is_causal=False, params=p,
                        fast=IMPLS[impl], stats=st)
    b = tiled_attention(q2[:, :, start:], k2, v2, mask, scale=0.25, is_causal=False, params=p,
                        fast=IMPLS[impl])
    assert st["path"] == "tiled"
    keep = cut - start
    # the reference's per-query selection computes a tile's rows over the union of its
    # queries' tiles: a later query of the tile changes that union, and the sums by an ulp
    tol = 0 if select == "row" else 1e-13
    torch.testing.assert_close(a[:, :, :keep], b[:, :, :keep], rtol=tol, atol=tol)
    assert not torch.equal(a[:, :, keep:], b[:, :, keep:])


@pytest.mark.parametrize("budget", [0.1, 0.25])
@pytest.mark.parametrize("nq", [300, 37])
def test_chunk_reads_its_budget_and_the_paths_agree(budget, nq):
    """A chunk reads ``budget`` of what its exact attention would (the budget is shared
    over its own rows), with left padding in one batch row, GQA and the state; the CPU
    path gives the reference arithmetic's output, and the chunk's error against exact
    attention is no larger than that of the same rows computed in one pass."""
    n = 1000
    q, k, v = _qkv(2, 6, 2, n, 16, seed=3, dtype=torch.float32)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :150] = False
    mask = _chunk_mask(nq, n, valid)
    p = _params(budget=budget, sharpness=6.0, features=16)
    outs = {}
    for impl, fast in IMPLS.items():
        st = {}
        outs[impl] = tiled_attention(q[:, :, n - nq:], k, v, mask, scale=0.25,
                                     is_causal=False, params=p, fast=fast, stats=st)
        assert st["path"] == "tiled" and st["mask"] == "causal+padding"
        assert st["impl"] == impl
        assert bool((st["levels"] == STATE).any()) or budget > 0.1
        assert st["reads_per_query"] <= budget * st["exact_reads_per_query"] * 1.02
        assert st["reads_per_query"] >= budget * st["exact_reads_per_query"] * 0.9
    torch.testing.assert_close(outs["cpu"], outs["reference"], rtol=2e-5, atol=2e-5)
    proj = random_features(16, 16, 2, seed=0, device="cpu", dtype=torch.float64)
    golden = tiled_attention_from_levels(q[:, :, n - nq:].double(), k.double(), v.double(),
                                         st["levels"], scale=0.25, causal=True, tile=16,
                                         key_valid=valid, feature_proj=proj)
    assert (outs["cpu"].double() - golden).abs().max() < 1e-4
    whole = tiled_attention(q, k, v, _chunk_mask(n, n, valid), scale=0.25, is_causal=False,
                            params=p, fast=cpu)[:, :, n - nq:]
    exact = exact_attention(q[:, :, n - nq:], k, v, mask, 0.25, False)
    err = float((outs["cpu"] - exact).norm() / exact.norm())
    err_whole = float((whole - exact).norm() / exact.norm())
    assert err <= 1.05 * err_whole, (err, err_whole)


def test_chunk_fallbacks_say_why():
    """What the tiles cannot place runs exact, with the reason: SDPA's top-left causal
    flag with fewer queries than keys, a bidirectional query block shorter than its keys
    (cross-attention: its queries have no positions among the keys; also where right
    padding of the keys makes every row look causal), more queries than keys."""
    q, k, v = _qkv(1, 4, 2, 200, 16, seed=4)
    p = _params()
    enc = torch.zeros(1, 1, 150, 200, dtype=torch.bool)
    enc[..., :120] = True  # cross-attention over right-padded keys: every query sees 0..119
    cases = [
        (q[:, :, 50:], k, v, None, True, "top-left"),
        (q[:, :, 50:], k, v, enc, False, "outnumber the keys they may see"),
        (q[:, :, 100:], k, v, enc[:, :, 50:], False, "cross-attention"),
        (q[:, :, 50:], k, v, None, False, "cross-attention"),
        (q[:, :, 50:], k, v, torch.ones(150, 200, dtype=torch.bool), False, "cross-attention"),
        (q, k[:, :, 100:], v[:, :, 100:], None, False, "more queries than keys"),
    ]
    for qq, kk, vv, mask, causal, reason in cases:
        st = {}
        out = tiled_attention(qq, kk, vv, mask, scale=0.25, is_causal=causal, params=p, stats=st)
        assert st["path"] == "exact" and reason in st["reason"], st
        torch.testing.assert_close(out, exact_attention(qq, kk, vv, mask, 0.25, causal))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nq", [1, 50])
def test_keys_no_query_sees_are_dropped(impl, nq):
    """A static cache hands the attention all its slots, the empty ones masked for every
    query: the queries are the last of the keys they see, not of the slots. The result
    is the one on the filled slots alone (the near field where the queries are)."""
    slots, filled = 400, 250
    q, k, v = _qkv(2, 6, 2, slots, 16, seed=7)
    q = q[:, :, filled - nq:filled]
    valid = torch.ones(2, filled, dtype=torch.bool)
    valid[1, :30] = False  # left padding in one batch row
    mask = torch.zeros(2, 1, nq, slots, dtype=torch.bool)
    mask[..., :filled] = _chunk_mask(nq, filled, valid)
    p = _params(budget=0.2, sharpness=6.0, features=8)
    st, st_f = {}, {}
    out = tiled_attention(q, k, v, mask, scale=0.25, is_causal=False, params=p,
                          fast=IMPLS[impl], stats=st)
    want = tiled_attention(q, k[:, :, :filled], v[:, :, :filled], mask[..., :filled],
                           scale=0.25, is_causal=False, params=p, fast=IMPLS[impl], stats=st_f)
    assert st["path"] == "tiled" and torch.equal(st["levels"], st_f["levels"])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # an additive mask whose empty slots are -inf: the same
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(tiled_attention(q, k, v, bias, scale=0.25, is_causal=False,
                                               params=p, fast=IMPLS[impl]),
                               want, rtol=1e-12, atol=1e-12)

