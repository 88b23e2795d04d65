"""Training-free baselines as level tables: exact at budget 1, within the budget, and
equal to SDPA with the block mask they stand for (fp64, so rounding is ~1e-15)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanite_compile import density
from nanite_compile.baselines import (
    BASELINES,
    BlockTopK,
    PooledKV,
    SinksWindow,
    SlidingWindow,
    baseline_attention,
    key_reads,
    use_baseline,
)
from nanite_compile.kernels.levels import EXACT, NONE
from nanite_compile.kernels.reference import exact_attention

B, H, HKV, D = 2, 4, 2, 16
ALL = [cls(tile=16) for cls in BASELINES.values()]


def qkv(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, n, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, n, D, generator=g, dtype=dtype)
    return q, k, v


def sdpa_block_mask(levels, tile, n):
    """``[B, H, N, N]`` bool: a key is visible when its tile is EXACT for the query's tile, and causal."""
    ex = levels == EXACT  # [B, Hkv, m, m]
    ex = ex.repeat_interleave(H // HKV, dim=1)
    tok = ex.repeat_interleave(tile, dim=2).repeat_interleave(tile, dim=3)[:, :, :n, :n]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return tok & causal


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
@pytest.mark.parametrize("n", [63, 200])
def test_budget_one_is_exact(method, n):
    q, k, v = qkv(n)
    out = baseline_attention(method, q, k, v, budget=1.0)
    ref = exact_attention(q, k, v, None, D**-0.5, True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    lv = method.levels(q, k, budget=1.0, scale=D**-0.5)
    reads, orig = key_reads(lv, method.tile, n, n)
    assert reads == orig


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n", [1000, 1500])  # long enough that the smallest setting fits 0.1
def test_reads_within_budget(method, budget, n):
    q, k, v = qkv(n, seed=1)
    records = []
    baseline_attention(method, q, k, v, budget=budget, records=records)
    (rec,) = records
    ratio = rec["reads"] / rec["original_reads"]
    assert ratio <= budget + 1e-12
    assert ratio > 0.5 * budget  # the rule spends the budget rather than leaving most of it
    assert rec["queries"] == B * HKV * n


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_more_budget_more_reads(method):
    q, k, _ = qkv(700, seed=2)
    got = [key_reads(method.levels(q, k, budget=b, scale=D**-0.5), 16, 700, 700)[0]
           for b in (0.1, 0.2, 0.4, 0.8, 1.0)]
    assert got == sorted(got)


def test_reads_count_matches_the_level_rule_definition():
    # a hand-made table: T = 4, rows j = 0..2; EXACT, POOL 1 (2 reads), POOL 2 (1 read)
    lv = torch.tensor([[[0, -1, -1], [1, 0, -1], [2, 1, 0]]], dtype=torch.int8)
    reads, orig = key_reads(lv, 4, 12, 12)
    assert reads == 4 * (4 + (2 + 4) + (1 + 2 + 4))
    assert orig == 4 * (4 + 8 + 12)


@pytest.mark.parametrize("n", [160, 203])
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_sliding_window_equals_sdpa_with_band_mask(n, budget):
    q, k, v = qkv(n, seed=3)
    T = 16
    method = SlidingWindow(tile=T)
    lv = method.levels(q, k, budget=budget, scale=D**-0.5)
    m = lv.shape[-1]
    dist = torch.arange(m)[:, None] - torch.arange(m)[None, :]
    w = int(((lv[0, 0] == EXACT) & (dist >= 0)).sum(-1).max())
    assert 1 <= w < m
    t = torch.arange(n)
    band = (t[None, :] <= t[:, None]) & (t[None, :] // T > t[:, None] // T - w)  # [N, N]
    out = baseline_attention(method, q, k, v, budget=budget)
    torch.testing.assert_close(out, sdpa(q, k, v, band), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [160, 203])
def test_sinks_window_equals_sdpa_with_sink_and_band_mask(n):
    q, k, v = qkv(n, seed=4)
    T = 16
    method = SinksWindow(tile=T, sinks=1)
    lv = method.levels(q, k, budget=0.3, scale=D**-0.5)
    assert bool((lv[..., 0] == EXACT).all())  # the sink tile, for every query tile
    out = baseline_attention(method, q, k, v, budget=0.3)
    torch.testing.assert_close(out, sdpa(q, k, v, sdpa_block_mask(lv, T, n)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [400, 403])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_block_topk_equals_sdpa_with_block_mask(n, budget):
    q, k, v = qkv(n, seed=5)
    T = 16
    method = BlockTopK(tile=T)
    lv = method.levels(q, k, budget=budget, scale=D**-0.5)
    m = lv.shape[-1]
    assert bool((lv.diagonal(dim1=-2, dim2=-1) == EXACT).all())
    assert set(lv.unique().tolist()) <= {EXACT, NONE}
    # the heads choose differently (the selection is query-aware, per KV head)
    assert not torch.equal(lv[0, 0], lv[0, 1]) or not torch.equal(lv[0], lv[1])
    # k + 1 tiles per row once k earlier tiles exist
    per_row = (lv == EXACT).sum(-1)
    assert bool((per_row[..., -1] == per_row.max()).all()) and int(per_row.max()) < m
    out = baseline_attention(method, q, k, v, budget=budget)
    torch.testing.assert_close(out, sdpa(q, k, v, sdpa_block_mask(lv, T, n)), rtol=0, atol=1e-12)


def test_block_topk_picks_the_tile_the_queries_attend_to():
    n, T = 256, 16
    q, k, v = qkv(n, seed=6)
    u = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=q.dtype)
    q = q + 2 * u  # every query shares a direction u
    k = k * 0.1
    target = 5  # tile 5's keys point along u
    k[:, :, target * T:(target + 1) * T] += 2 * u
    lv = BlockTopK(tile=T).levels(q, k, budget=0.3, scale=D**-0.5)
    assert int((lv[0, 0, -1] == EXACT).sum()) == 2  # k = 1: the own tile and one more
    assert bool((lv[:, :, target + 1:, target] == EXACT).all())


def test_pooled_kv_levels_are_uniform_outside_the_near_field():
    q, k, v = qkv(512, seed=7)
    method = PooledKV(tile=16)
    lv = method.levels(q, k, budget=0.25, scale=D**-0.5)
    vals = set(lv.unique().tolist())
    pools = vals - {EXACT, NONE}
    assert len(pools) == 1 and 1 <= pools.pop() <= 4
    # and it agrees with the pooled formula written out for one query tile
    out = baseline_attention(method, q, k, v, budget=0.25)
    r = int(lv.max())
    j = lv.shape[-1] - 1
    g = 2**r
    T = 16
    row = lv[0, 0, j]
    keys, vals_, bias = [], [], []
    for i in range(j + 1):
        kt, vt = k[0, 0, i * T:(i + 1) * T], v[0, 0, i * T:(i + 1) * T]
        if row[i] == EXACT:
            keys.append(kt), vals_.append(vt), bias.append(torch.zeros(T, dtype=k.dtype))
        else:
            keys.append(kt.reshape(-1, g, D).mean(1)), vals_.append(vt.reshape(-1, g, D).mean(1))
            bias.append(torch.full((T // g,), math.log(g), dtype=k.dtype))
    kk, vv, bb = torch.cat(keys), torch.cat(vals_), torch.cat(bias)
    qq = q[0, 0, j * T:(j + 1) * T]
    s = qq @ kk.T * D**-0.5 + bb
    pos = torch.cat([torch.arange(i * T, (i + 1) * T) if row[i] == EXACT
                     else torch.full((T // g,), -1) for i in range(j + 1)])
    s = s.masked_fill(pos[None, :] > torch.arange(j * T, (j + 1) * T)[:, None], -math.inf)
    ref = torch.softmax(s, -1) @ vv
    torch.testing.assert_close(out[0, 0, j * T:(j + 1) * T], ref, rtol=0, atol=1e-12)


def test_budget_outside_range_raises():
    q, k, _ = qkv(64)
    with pytest.raises(ValueError, match="budget"):
        SlidingWindow(tile=16).levels(q, k, budget=0.0, scale=1.0)
    with pytest.raises(ValueError, match="power of two"):
        SlidingWindow(tile=12)


# ------------------------------------------------------------- a tiny Llama


@pytest.fixture(scope="module")
def tiny_llama():
    pytest.importorskip("transformers")
    from tiny_models import tiny_llama as build

    return build(vocab=97, hidden=64, max_pos=512, impl="sdpa")


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_hf_model_at_budget_one_is_the_original(tiny_llama, method):
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        with use_baseline(tiny_llama, method, 1.0) as records:
            out = tiny_llama(ids).logits
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored
    assert len(records) == 2  # one per layer
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_hf_model_under_budget(tiny_llama, method):
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        with use_baseline(tiny_llama, method, 0.3) as records:
            out = tiny_llama(ids).logits
    ratio = sum(r["reads"] for r in records) / sum(r["original_reads"] for r in records)
    assert ratio <= 0.3
    assert not torch.allclose(out, ref)  # attention did change
    assert torch.isfinite(out).all()


def test_hf_function_outside_the_block_raises(tiny_llama):
    from nanite_compile.baselines import ATTN_IMPLEMENTATION

    with use_baseline(tiny_llama, SlidingWindow(tile=16), 0.5):
        pass
    tiny_llama.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        with pytest.raises(RuntimeError, match="use_baseline"), torch.no_grad():
            tiny_llama(torch.zeros(1, 40, dtype=torch.long))
    finally:
        tiny_llama.set_attn_implementation("sdpa")


# ------------------------------------------------------------- density proxies


def test_density_masses_are_distributions():
    n, T = 200, 16
    q, k, _ = qkv(n, seed=8)
    for mass in (density.attention_mass(q, k, T, D**-0.5, chunk=64),
                 density.tile_mass_estimate(q, k, T, D**-0.5)):
        m = -(-n // T)
        assert mass.shape == (B, HKV, m, m)
        torch.testing.assert_close(mass.sum(-1), torch.ones(B, HKV, m, dtype=q.dtype))
        assert float(mass.triu(1).abs().max()) == 0.0  # causal


def test_density_dispersions_and_quest_bound():
    n, T = 96, 16
    q, k, v = qkv(n, seed=9)
    flat = k.clone()
    flat[:, :, :T] = flat[:, :, :1]  # tile 0: all keys equal
    disp = density.key_dispersion(flat, T)
    assert disp.shape == (B, HKV, n // T) and float(disp[..., 0].abs().max()) < 1e-24
    assert bool((disp[..., 1:] > 0).all())
    assert density.value_dispersion(v, T).shape == (B, HKV, n // T)
    # the bound is at least the tile's largest logit for every query, so also on average
    bound = density.quest_bound(q, k, T, D**-0.5)  # [B, Hkv, m, m]
    logit = torch.einsum("bhgnd,bhkd->bhgnk", q.reshape(B, HKV, 2, n, D), k) * D**-0.5
    tmax = logit.reshape(B, HKV, 2, n, n // T, T).amax(-1)  # [B,Hkv,G,N,m]
    tmax = tmax.reshape(B, HKV, 2, n // T, T, n // T).mean((2, 4))
    lower = torch.tril(torch.ones(n // T, n // T, dtype=torch.bool), -1)
    assert bool((bound[..., lower] >= tmax[..., lower] - 1e-12).all())
    proj = torch.randn(HKV, D, 32, dtype=q.dtype)
    sc = density.state_change(k, v, T, D**-0.5, proj)
    assert sc.shape == (B, HKV, n // T) and bool((sc > 0).all())


# ------------------------------------------------------------- the CLI entry


def test_cli_quality_runs_the_quality_script(capsys, monkeypatch):
    from nanite_compile import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["quality", "--", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--methods" in out and "--budgets" in out
    monkeypatch.setattr(cli, "_benchmark_script", lambda name: None)
    assert cli.main(["quality"]) == 2
    assert "benchmarks/quality.py" in capsys.readouterr().err
