"""The Triton forward kernel (``kernels/triton_attn.py``) against the PyTorch reference.

Without CUDA the kernel runs under the Triton interpreter on the CPU:
``conftest.py`` of this folder sets ``TRITON_INTERPRET=1`` before Triton is
first imported (the interpreter needs it then: Triton's own ``tl`` helpers are
jitted at import). With CUDA nothing is set, and the same tests run the
compiled kernel on the GPU, plus the realistic sizes of ``test_gpu_*``.

Tolerances follow CONVENTIONS.md: an fp64 run of the reference is the golden
result; the kernel's error must stay within 4x the error of the reference run
in the kernel's dtype, plus a few ulps of the output's size.
"""

from __future__ import annotations

import pytest
import torch
from triton_marks import CUDA, DEV, TRITON_MARKS

from nanite_compile.kernels import ops, triton_attn
from nanite_compile.kernels.levels import (
    EXACT,
    NONE,
    STATE,
    TileParams,
    build_levels,
    tile_density,
)
from nanite_compile.kernels.reference import (
    random_features,
    tiled_attention,
    tiled_attention_from_levels,
)

pytestmark = TRITON_MARKS
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------
# helpers


def assert_golden(out, golden, baseline, factor=4.0, ulps=1):
    """Error vs the fp64 golden within ``factor`` x the same-dtype reference's, plus ulps."""
    assert out.dtype == baseline.dtype and out.shape == golden.shape
    assert bool(torch.isfinite(out).all()), "non-finite output"
    err = (out.double() - golden).abs().max().item()
    base = (baseline.double() - golden).abs().max().item()
    floor = ulps * torch.finfo(out.dtype).eps * max(1.0, golden.abs().max().item())
    assert err <= factor * base + floor, f"error {err:.3e} vs reference error {base:.3e}"


def qkv(b, h, hkv, n, d, dv, seed, dtype=torch.float32, scale=1.0, nq=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * scale
    k = torch.randn(b, hkv, n, d, generator=g) * scale
    v = torch.randn(b, hkv, n, dv, generator=g)
    if nq is not None:
        q = q[:, :, n - nq:]
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype)


def key_padding(b, n, kind):
    """``[B, N]`` bool: batch 0 with a hole inside a tile, batch 1 padded left or right."""
    valid = torch.ones(b, n, dtype=torch.bool)
    if kind == "left":
        valid[-1, : n // 3 + 1] = False
    elif kind == "right":
        valid[-1, n - n // 3 - 1:] = False
    if kind is not None and b > 1:
        valid[0, 5:9] = False
    return valid.to(DEV)


def random_table(b, hkv, mq, mk, causal, choices, seed):
    """A level table from ``choices``, EXACT diagonal, NONE above it when causal."""
    g = torch.Generator().manual_seed(seed)
    lv = torch.tensor(choices, dtype=torch.int8)[torch.randint(len(choices), (b, hkv, mq, mk),
                                                               generator=g)]
    qt = (mk - mq + torch.arange(mq))[:, None]
    kt = torch.arange(mk)[None, :]
    lv = lv.masked_fill(qt == kt, EXACT)
    if causal:
        lv = lv.masked_fill(kt > qt, NONE)
    return lv.to(DEV)


def check(q, k, v, lv, *, scale, causal, tile, key_valid=None, proj=None, **kw):
    """Kernel vs the reference in q's dtype, both against the fp64 reference.

    The entry block is ``BLOCK_E`` unless given (``block_e=None``: the CUDA autotune),
    so that on a GPU the small cases do not compile every candidate.
    """
    kw.setdefault("block_e", triton_attn.BLOCK_E)
    out = triton_attn.tiled_attention_triton(
        q, k, v, lv, scale=scale, causal=causal, tile=tile, key_valid=key_valid,
        feature_proj=proj, **kw)
    args = {"scale": scale, "causal": causal, "tile": tile, "key_valid": key_valid}
    base = tiled_attention_from_levels(q, k, v, lv, feature_proj=proj, **args)
    golden = tiled_attention_from_levels(
        q.double(), k.double(), v.double(), lv,
        feature_proj=None if proj is None else proj.double(), **args)
    assert_golden(out, golden, base)
    return out


ALL_KINDS = [EXACT, 1, 2, 3, STATE, NONE]


# ---------------------------------------------------------------------------
# hand-built level tables


@pytest.mark.parametrize(
    "n,tile,h,hkv,causal,pad,choices",
    [
        (45, 8, 4, 2, True, None, ALL_KINDS),  # odd length, GQA 2
        (45, 8, 6, 2, True, "right", ALL_KINDS),  # GQA 3, padding
        (70, 16, 3, 1, True, "left", [EXACT, 1, 2, 4, STATE, NONE]),  # GQA 3 on one KV head
        (37, 8, 2, 2, False, "left", ALL_KINDS),  # bidirectional, no GQA
        (64, 8, 4, 2, True, None, [EXACT, NONE]),  # block sparse
        (64, 16, 4, 2, True, "right", [STATE]),  # state everywhere but the diagonal
    ],
)
def test_level_mix_matches_reference(n, tile, h, hkv, causal, pad, choices):
    """EXACT, every POOL level, STATE and NONE mixed per KV head, several query tiles."""
    b, d = 2, 16
    q, k, v = qkv(b, h, hkv, n, d, d, seed=n + h, scale=0.8)
    m = -(-n // tile)
    lv = random_table(b, hkv, m, m, causal, choices, seed=n)
    proj = random_features(d, 16, hkv, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=d**-0.5, causal=causal, tile=tile, key_valid=key_padding(b, n, pad),
          proj=proj)


def test_value_width_and_feature_width_differ():
    """Dv != D, F not a power of two, D not a power of two: the padded blocks are masked."""
    b, h, hkv, n, d, dv, tile = 1, 4, 2, 50, 12, 20, 8
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=2)
    lv = random_table(b, hkv, 7, 7, True, ALL_KINDS, seed=3)
    proj = random_features(d, 10, hkv, seed=1, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=d**-0.5, causal=True, tile=tile, proj=proj)


@pytest.mark.parametrize("block_e", sorted({16, *triton_attn.BLOCK_E_CHOICES}))
def test_entry_block_size_does_not_change_the_result(block_e):
    """Several entry blocks per row (16) or one: the same output to rounding, for every
    block size the autotune may pick."""
    q, k, v = qkv(1, 4, 2, 80, 16, 16, seed=5)
    lv = random_table(1, 2, 10, 10, True, [EXACT, EXACT, 1, STATE], seed=5)
    proj = random_features(16, 16, 2, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=0.25, causal=True, tile=8, proj=proj, block_e=block_e)


def test_autotune_times_each_choice_once_per_plan(monkeypatch):
    """The entry-block choice: every candidate timed once, the fastest kept, then cached."""
    monkeypatch.setattr(triton_attn, "_BEST_BLOCK_E", {})
    launched, timed = [], []
    fake_ms = {32: 3.0, 64: 1.0, 128: 2.0}

    def timer(fn):
        fn()
        timed.append(launched[-1])
        return fake_ms[launched[-1]]

    for _ in range(2):
        be = triton_attn._pick_block_e(("plan",), launched.append, timer)
        assert be == 64
    assert sorted(timed) == sorted(triton_attn.BLOCK_E_CHOICES)
    assert triton_attn._pick_block_e(("other plan",), launched.append, timer) == 64
    assert len(timed) == 2 * len(triton_attn.BLOCK_E_CHOICES)

    def too_big(fn):  # the largest block does not fit (shared memory): skipped
        fn()
        if launched[-1] == 128:
            raise triton_attn._OUT_OF_RESOURCES(2**18, 2**17, "shared memory")
        return fake_ms[launched[-1]]

    fake_ms[128] = 0.5
    assert triton_attn._pick_block_e(("third plan",), launched.append, too_big) == 64


def test_single_query_decode():
    """Nq = 1 (the last of Nk positions): one query tile, only its last row written."""
    n = 53
    q, k, v = qkv(2, 4, 2, n, 16, 16, seed=7, nq=1)
    mk = -(-n // 8)
    lv = random_table(2, 2, 1, mk, True, ALL_KINDS, seed=7)
    proj = random_features(16, 16, 2, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=0.25, causal=True, tile=8, key_valid=key_padding(2, n, "left"),
          proj=proj)


def test_strided_queries():
    """Queries as a transposed view of ``[B, N, H, D]`` (no copy needed by the kernel)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 40, 4, 16, generator=g).to(DEV).transpose(1, 2)
    _, k, v = qkv(1, 4, 2, 40, 16, 16, seed=1)
    lv = random_table(1, 2, 5, 5, True, ALL_KINDS, seed=1)
    proj = random_features(16, 16, 2, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=0.25, causal=True, tile=8, proj=proj)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """fp16/bf16 in and out, fp32 accumulation; half-precision dot operands."""
    b, h, hkv, n, d, tile = 2, 6, 2, 45, 16, 8
    q, k, v = qkv(b, h, hkv, n, d, d, seed=11, dtype=dtype)
    lv = random_table(b, hkv, 6, 6, True, ALL_KINDS, seed=11)
    proj = random_features(d, 16, hkv, seed=0, device=DEV, dtype=torch.float32)
    out = check(q, k, v, lv, scale=d**-0.5, causal=True, tile=tile,
                key_valid=key_padding(b, n, "right"), proj=proj)
    assert out.dtype == dtype


def test_huge_logits_stay_finite():
    """Logits of size 1e3: exact terms, summaries and the state share one finite scale."""
    q, k, v = qkv(1, 4, 2, 64, 16, 16, seed=0, scale=8.0)
    lv = random_table(1, 2, 8, 8, True, [EXACT, 2, STATE, STATE, NONE], seed=0)
    proj = random_features(16, 16, 2, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=0.25, causal=True, tile=8, proj=proj)


def test_every_output_row_is_written(monkeypatch):
    """The output comes from ``torch.empty`` filled with NaN: no row is left unwritten."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    q, k, v = qkv(2, 4, 2, 30, 16, 16, seed=3)
    valid = key_padding(2, 30, "right")
    valid[1] = False  # a batch with no key at all: zeros, as SDPA gives for empty rows
    lv = random_table(2, 2, 4, 4, True, [EXACT, 1, NONE], seed=2)
    lv[1] = torch.where(lv[1] == EXACT, NONE, lv[1])
    out = triton_attn.tiled_attention_triton(q, k, v, lv, scale=0.25, causal=True, tile=8,
                                             key_valid=valid)
    assert bool(torch.isfinite(out).all()) and bool((out[1] == 0).all())


def test_contract_violations_raise():
    """Causal tables must have an EXACT diagonal and nothing above it (the rule guarantees it)."""
    q, k, v = qkv(1, 2, 1, 32, 16, 16, seed=0)
    lv = random_table(1, 1, 4, 4, True, [EXACT], seed=0)
    bad = lv.clone()
    bad[0, 0, 2, 2] = 1
    with pytest.raises(ValueError, match="diagonal"):
        triton_attn.tiled_attention_triton(q, k, v, bad, scale=0.25, causal=True, tile=8)
    bad = lv.clone()
    bad[0, 0, 1, 3] = EXACT
    with pytest.raises(ValueError, match="above the diagonal"):
        triton_attn.tiled_attention_triton(q, k, v, bad, scale=0.25, causal=True, tile=8)
    with pytest.raises(ValueError, match="levels must be"):
        triton_attn.tiled_attention_triton(q, k, v, lv[:, :, 1:], scale=0.25, causal=True, tile=8)


# ---------------------------------------------------------------------------
# tables from the run-time rule, through the driver


def _params(budget, tile=8, features=16, **kw):
    base = {"window": 1, "anchors": 1, "horizon": None, "budget_reads": None}
    base.update(kw)
    return TileParams(tile=tile, budget=budget, state_features=features, **base)


@pytest.mark.parametrize(
    "n,h,hkv,budget,pad,causal",
    [
        (150, 4, 2, 0.25, None, True),
        (150, 6, 2, 0.1, "right", True),
        (133, 3, 1, 0.3, "left", False),
    ],
)
def test_run_time_rule_tables(n, h, hkv, budget, pad, causal):
    """``build_levels`` tables (POOL levels and STATE among them) give the reference's output."""
    b, d, tile = 2, 16, 8
    q, k, v = qkv(b, h, hkv, n, d, d, seed=n, scale=0.8)
    valid = key_padding(b, n, pad)
    p = _params(budget, tile=tile)
    kc = torch.nn.functional.pad(k, (0, 0, 0, -n % tile))
    vp = torch.nn.functional.pad(valid, (0, -n % tile), value=False)
    m = kc.shape[2] // tile
    lv = build_levels(tile_density(kc, vp, tile), torch.arange(m, device=DEV), p, causal=causal,
                      window=None, tile_valid=vp.reshape(b, m, tile).any(-1), nk=n)
    assert bool((lv > 0).any()), "the rule made no POOL tile: the case tests less than it says"
    assert bool((lv == STATE).any()) or not causal
    proj = random_features(d, 16, hkv, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=d**-0.5, causal=causal, tile=tile, key_valid=valid, proj=proj)


def test_driver_uses_the_kernel(monkeypatch):
    """``reference.tiled_attention(fast=triton_attn)`` runs the kernel where it applies."""
    calls = []
    real = triton_attn.run
    monkeypatch.setattr(triton_attn, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = qkv(1, 4, 2, 100, 16, 16, seed=1)
    mask = torch.ones(100, 100, dtype=torch.bool, device=DEV).tril()
    st: dict = {}
    out = tiled_attention(q, k, v, mask, scale=0.25, is_causal=False,
                          params=_params(0.25), stats=st, fast=triton_attn)
    assert calls and st["path"] == "tiled" and st["impl"] == "triton_attn"
    args = {"scale": 0.25, "causal": True, "tile": 8}
    ref = tiled_attention_from_levels(q, k, v, st["levels"], **args)
    golden = tiled_attention_from_levels(q.double(), k.double(), v.double(), st["levels"], **args)
    assert_golden(out, golden, ref)
    # a sliding window is not the kernel's: the reference arithmetic runs instead
    calls.clear()
    win = mask & ~torch.ones(100, 100, dtype=torch.bool, device=DEV).tril(-40)
    tiled_attention(q, k, v, win, scale=0.25, is_causal=False, params=_params(0.25),
                    fast=triton_attn)
    assert not calls


def test_driver_runs_a_chunk_continuing_a_cache(monkeypatch):
    """A causal chunk after a cache (37 queries against 100 keys, starting inside a tile,
    the decoder's bottom-right mask, left padding in one batch row) runs the kernel, with
    the level table of its own query tiles."""
    calls = []
    real = triton_attn.run
    monkeypatch.setattr(triton_attn, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    n, nq = 100, 37
    q, k, v = qkv(2, 4, 2, n, 16, 16, seed=3, nq=nq)
    valid = key_padding(2, n, "left")
    qpos = torch.arange(n - nq, n, device=DEV)[:, None]
    mask = (torch.arange(n, device=DEV)[None, :] <= qpos)[None, None] & valid[:, None, None, :]
    st: dict = {}
    out = tiled_attention(q, k, v, mask, scale=0.25, is_causal=False, params=_params(0.25),
                          stats=st, fast=triton_attn)
    assert calls and st["path"] == "tiled" and st["impl"] == "triton_attn"
    assert st["levels"].shape[2] == -(-n // 8) - (n - nq) // 8  # the chunk's query tiles
    args = {"scale": 0.25, "causal": True, "tile": 8, "key_valid": valid}
    ref = tiled_attention_from_levels(q, k, v, st["levels"], **args)
    golden = tiled_attention_from_levels(q.double(), k.double(), v.double(), st["levels"],
                                         **args)
    assert_golden(out, golden, ref)


def test_supports():
    q = torch.zeros(1, 2, 8, 16, device=DEV)
    assert triton_attn.supports(q, q, None)
    assert not triton_attn.supports(q, q, 64)
    assert not triton_attn.supports(q.double(), q.double(), None)
    assert not triton_attn.supports(torch.zeros(1, 2, 8, 512, device=DEV), q, None)


# ---------------------------------------------------------------------------
# the compiled kernel on a GPU, realistic sizes


def _golden_check_rule(n, budget, dtype, features=64, h=9, hkv=3, d=64, tile=64, pad=None):
    b = 1 if pad is None else 2
    q, k, v = qkv(b, h, hkv, n, d, d, seed=n, dtype=dtype)
    valid = None if pad is None else key_padding(b, n, pad)
    p = TileParams(tile=tile, window=2, anchors=1, horizon=None, budget=budget,
                   budget_reads=None, state_features=features)
    npad = -n % tile
    kc = torch.nn.functional.pad(k.float(), (0, 0, 0, npad))
    vp = torch.nn.functional.pad(
        torch.ones(b, n, dtype=torch.bool, device=DEV) if valid is None else valid,
        (0, npad), value=False)
    m = kc.shape[2] // tile
    lv = build_levels(tile_density(kc, vp, tile), torch.arange(m, device=DEV), p, causal=True,
                      window=None, tile_valid=vp.reshape(b, m, tile).any(-1), nk=n)
    proj = random_features(d, features, hkv, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=d**-0.5, causal=True, tile=tile, key_valid=valid, proj=proj,
          block_e=None)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_gpu_rule_tables_at_4k(budget, dtype):
    """The compiled kernel at N = 4096 + 37, 9/3 heads, D = 64, tile 64, against fp64."""
    _golden_check_rule(4096 + 37, budget, dtype)


@needs_cuda
def test_gpu_padding_and_all_kinds():
    """Padding and a hand table of every level kind at tile 64, compiled."""
    _golden_check_rule(2048 + 5, 0.1, torch.float32, pad="left")
    q, k, v = qkv(2, 8, 2, 1000, 128, 128, seed=0, dtype=torch.bfloat16)
    m = -(-1000 // 64)
    lv = random_table(2, 2, m, m, True, [EXACT, 1, 3, 6, STATE, NONE], seed=0)
    proj = random_features(128, 32, 2, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=128**-0.5, causal=True, tile=64, proj=proj)


@needs_cuda
def test_gpu_op_runs_the_triton_kernel():
    """The registered op on CUDA tensors takes the Triton path and matches the reference."""
    q, k, v = qkv(1, 9, 3, 4096, 64, 64, seed=1)
    # a horizon of 16 tiles: the 64-tile table has STATE tiles beyond it
    plan = (64, 2, 1, 16, 0.1, 0, 64, 0, "s")
    with ops.recording() as rec:
        out = torch.ops.nanite.tiled_attention(q, k, v, None, 0.125, True, *plan)
    r = rec["s"][0]
    assert r["path"] == "tiled" and r["impl"] == "triton_attn"
    st: dict = {}
    tiled_attention(q, k, v, None, scale=0.125, is_causal=True, params=ops._params(*plan[:7]),
                    stats=st)
    lv = st["levels"]
    assert bool((lv == STATE).any()) and bool((lv > 0).any())
    proj = random_features(64, 64, 3, seed=0, device=DEV, dtype=torch.float32)
    check(q, k, v, lv, scale=0.125, causal=True, tile=64, proj=proj)
    golden = tiled_attention_from_levels(q.double(), k.double(), v.double(), lv, scale=0.125,
                                         causal=True, tile=64, feature_proj=proj.double())
    base = tiled_attention_from_levels(q, k, v, lv, scale=0.125, causal=True, tile=64,
                                       feature_proj=proj)
    assert_golden(out, golden, base)
