"""Numerics of the registered op at the edges (issue 6, "Numerics").

Everything here goes through ``torch.ops.nanite.tiled_attention`` (what a
converted model calls), with the run-time record saying which path ran, and is
compared with ``F.scaled_dot_product_attention`` on the same inputs and mask:

- logits of size 1e4 of both signs, under every mask form, GQA, fp32/fp16/bf16,
  at budget 1.0 (the exact path: SDPA within the fp64-golden tolerance), 0.25
  (pooled summaries) and 0.05 (the random-feature STATE as well): no NaN or
  inf where SDPA is finite, every output a convex combination of values;
- a finite additive mask value that does not outweigh the logits (``-1e4``
  next to logits of 1e4) blocks nothing in SDPA: the op must not treat it as
  a hard block;
- fully masked rows (padding: bool, ``-inf``, ``finfo.min``; a whole batch
  element; one decoding query): the same values as SDPA (0 for bool and
  ``-inf``, SDPA's average for a finite minimum);
- N = 1 and a single decoding query, with and without masks;
- fp16 and bf16 at N = 4096, budget 0.25: finite wherever SDPA is.

The existing kernel tests (``tests/kernels``) cover the reference arithmetic
itself; these check the op end to end at sizes and scales a model can reach.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanite_compile.kernels import ops

OP = torch.ops.nanite.tiled_attention
SITE = "numerics"
TILE = 16
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def call(q, k, v, mask=None, *, causal=False, budget=0.25, features=16, tile=TILE, scale=None):
    """The op with the plan of a converted site; returns (output, run-time record)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with ops.recording() as rec:
        out = OP(q, k, v, mask, scale, causal, tile, 2, 1, -1, budget, 0, features, 0, SITE)
    return out, rec[SITE][-1]


def sdpa(q, k, v, mask=None, *, causal=False, scale=None):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def qkv(b, h, hkv, nq, nk, d, *, seed, dtype=torch.float32, logit=None):
    """Random q, k, v; with ``logit``, q scaled so the largest |scale q.k| is about that."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    if logit is not None:
        kk = k.repeat_interleave(h // hkv, 1)
        top = (q @ kk.transpose(-1, -2)).abs().amax() * d**-0.5
        q = q * (logit / top)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def allowed_mask(b, nq, nk, *, causal, pad=None):
    """``[B, 1, Nq, Nk]`` bool: causal (queries are the last ``nq`` positions) and padding
    of batch element 1 (``"left"``/``"right"``, a third of the keys)."""
    qpos = torch.arange(nk - nq, nk)[:, None]
    kpos = torch.arange(nk)[None, :]
    allowed = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if causal:
        allowed &= kpos <= qpos
    if pad == "left":
        allowed[1, :, :, : nk // 3] = False
    elif pad == "right":
        allowed[1, :, :, nk - nk // 3 :] = False
    return allowed


def as_form(allowed, form, dtype):
    """The mask as a model hands it over: bool, additive ``-inf`` or ``finfo.min``."""
    if form == "bool":
        return allowed
    fill = -math.inf if form == "-inf" else torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, fill)


def in_value_range(out, v, allowed=None, finite_mask=False):
    """Each output row lies in the [min, max] box of the values it may see (all if none).
    A fully masked row is 0, or, under a finite mask (``finite_mask``), SDPA's average:
    in the box of all values."""
    h = out.shape[1]
    vv = v.double().repeat_interleave(h // v.shape[1], 1)  # [B, H, Nk, D]
    if allowed is None:
        lo = vv.amin(2, keepdim=True)
        hi = vv.amax(2, keepdim=True)
    else:
        a = allowed.expand(out.shape[0], h, out.shape[2], vv.shape[2])[..., None]
        big = torch.tensor(math.inf, dtype=torch.float64)
        lo = torch.where(a, vv[:, :, None], big).amin(3)
        hi = torch.where(a, vv[:, :, None], -big).amax(3)
        empty = ~a.any(3)
        if finite_mask:
            lo = torch.where(empty, vv.amin(2, keepdim=True), lo)
            hi = torch.where(empty, vv.amax(2, keepdim=True), hi)
        else:
            lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    tol = 1e-2 * vv.abs().amax() if out.dtype != torch.float32 else 1e-5 * vv.abs().amax()
    o = out.double()
    return bool(((o >= lo - tol) & (o <= hi + tol)).all())


def assert_golden(out, golden, baseline, what=""):
    """Error vs fp64 within 4x the same-dtype SDPA's own error plus a few ulps."""
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"
    err = (out.double() - golden).abs().max().item()
    base = (baseline.double() - golden).abs().max().item()
    floor = 4 * torch.finfo(out.dtype).eps * max(1.0, golden.abs().max().item())
    assert err <= 4 * base + floor, f"{what}: error {err:.3e} vs SDPA's own {base:.3e}"


# --------------------------------------------------------------------- logits of 1e4

N = 200  # 12.5 tiles: several tiles and a partial one


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "form,causal,pad",
    [
        ("none", True, None),
        ("none", False, None),
        ("bool", True, "left"),
        ("bool", False, "right"),
        ("-inf", True, "right"),
        ("min", True, "left"),
        ("min", False, "left"),
    ],
)
def test_logits_of_1e4(dtype, form, causal, pad):
    dt = DTYPES[dtype]
    q, k, v = qkv(2, 4, 2, N, N, 16, seed=3, dtype=dt, logit=1e4)
    allowed = allowed_mask(2, N, N, causal=causal, pad=pad)
    mask = None if form == "none" else as_form(allowed, form, dt)
    op_causal = causal and mask is None
    ref = sdpa(q, k, v, mask, causal=op_causal)
    gold = sdpa(q.double(), k.double(), v.double(), None if mask is None else mask.double()
                if mask.is_floating_point() else mask, causal=op_causal)  # fmt: skip
    if mask is None:
        allowed = None if not causal else allowed[:1]
    finite = torch.isfinite(ref)
    for budget, path in ((1.0, "exact"), (0.25, "tiled"), (0.05, "tiled")):
        out, rec = call(q, k, v, mask, causal=op_causal, budget=budget)
        what = f"budget {budget}"
        assert rec["path"] == path, f"{what}: {rec}"
        assert out.dtype == dt and out.shape == ref.shape
        assert bool(torch.isfinite(out[finite]).all()), f"{what}: NaN/inf where SDPA is finite"
        inside = in_value_range(out, v, allowed, finite_mask=form == "min")
        assert inside, f"{what}: not a convex combination of values"
        if budget == 1.0:
            assert_golden(out, gold, ref, what)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logits_of_minus_1e4_everywhere(dtype):
    """Every logit hugely negative (q = -k direction): the softmax shift must not underflow."""
    dt = DTYPES[dtype]
    q, k, v = qkv(1, 2, 2, N, N, 16, seed=5, dtype=torch.float64)
    k = -q.clone()  # q.k = -|q|^2 < 0 for every matching pair, scaled to about -1e4
    q = q * (1e4 / ((q * q).sum(-1).amax() * 16**-0.5)).sqrt()
    k = k * (1e4 / ((k * k).sum(-1).amax() * 16**-0.5)).sqrt()
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    ref = sdpa(q, k, v, causal=True)
    for budget in (1.0, 0.25, 0.05):
        out, rec = call(q, k, v, causal=True, budget=budget)
        assert bool(torch.isfinite(out).all()), f"budget {budget}: {rec['path']}"
        assert in_value_range(out, v, allowed_mask(1, N, N, causal=True))
    assert bool(torch.isfinite(ref).all())


def test_finite_mask_that_does_not_outweigh_the_logits():
    """SDPA adds a mask: ``-1e4`` next to logits of up to 3e4 is a bias, not a block (old
    BERT-style masks are ``(1 - m) * -10000``). Rows the op computes exactly (the first tile
    sees only itself) must equal SDPA with that mask."""
    q, k, v = qkv(1, 2, 2, N, N, 16, seed=0, logit=3e4)
    allowed = allowed_mask(1, N, N, causal=True)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, -1e4)
    ref = sdpa(q, k, v, mask)
    assert not torch.allclose(ref, sdpa(q, k, v, causal=True), atol=1e-3)  # it does leak
    out, rec = call(q, k, v, mask, budget=0.25)
    torch.testing.assert_close(out[:, :, :TILE], ref[:, :, :TILE], rtol=1e-4, atol=1e-4)
    # the same mask with logits of ordinary size blocks: the tiled path may run
    q, k, v = qkv(1, 2, 2, N, N, 16, seed=0)
    out, rec = call(q, k, v, mask, budget=0.25)
    assert rec["path"] == "tiled", rec
    torch.testing.assert_close(out[:, :, :TILE], sdpa(q, k, v, mask)[:, :, :TILE])


# --------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", ["bool", "-inf", "min"])
@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_fully_masked_rows_follow_sdpa(dtype, form, budget):
    """Padding queries whose every key is masked, a batch element with no valid key at all,
    and an empty row in the middle: what SDPA gives (0 for bool / -inf, its average of the
    values for a finite minimum), every other row finite."""
    dt = DTYPES[dtype]
    b = 3
    q, k, v = qkv(b, 4, 2, N, N, 16, seed=1, dtype=dt)
    allowed = allowed_mask(b, N, N, causal=True)
    allowed[1, :, :, :70] = False  # left padding: queries 0..69 of batch 1 see nothing
    allowed[2] = False  # batch 2 is all padding
    allowed[0, :, 150] = False  # one empty row
    mask = as_form(allowed, form, dt)
    ref = sdpa(q, k, v, mask)
    gold = sdpa(q.double(), k.double(), v.double(), mask if form == "bool" else mask.double())
    out, rec = call(q, k, v, mask, budget=budget)
    empty = ~allowed.any(-1).expand(b, 4, N)  # [B, H, N]
    assert bool(torch.isfinite(out).all()), rec
    if form in ("bool", "-inf"):
        assert bool((ref[empty] == 0).all())  # the convention being matched
        assert bool((out[empty] == 0).all()), f"fully masked rows are not 0: {rec}"
    else:  # a finite minimum: SDPA averages; compare with the fp64 golden as SDPA is
        assert_golden(out[empty], gold[empty], ref[empty], "fully masked rows")
    if budget == 1.0:
        assert_golden(out, gold, ref, "budget 1.0")
    else:
        # finite-mask empty rows are recomputed exactly; here too many for the tiled path
        assert rec["path"] == ("exact" if form == "min" else "tiled"), rec
        # the first tile of each batch element is EXACT: there the op is SDPA
        assert_golden(out[:, :, :TILE], gold[:, :, :TILE], ref[:, :, :TILE], "first tile")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", ["bool", "-inf", "min"])
def test_decoding_query_with_no_visible_key(dtype, form):
    """One query against a cache whose every key is padding (and one with some keys)."""
    dt = DTYPES[dtype]
    q, k, v = qkv(2, 4, 2, 1, N, 16, seed=2, dtype=dt)
    allowed = torch.ones(2, 1, 1, N, dtype=torch.bool)
    allowed[0] = False
    allowed[1, :, :, :50] = False
    mask = as_form(allowed, form, dt)
    ref = sdpa(q, k, v, mask)
    gold = sdpa(q.double(), k.double(), v.double(), mask if form == "bool" else mask.double())
    out, rec = call(q, k, v, mask, budget=0.25)
    assert rec["path"] == ("exact" if form == "min" else "tiled"), rec  # as above
    assert bool(torch.isfinite(out).all())
    if form == "min":
        assert_golden(out[0], gold[0], ref[0], "no visible key")
    else:
        assert bool((out[0] == 0).all()) and bool((ref[0] == 0).all())
    assert in_value_range(out[1:], v[1:], allowed[1:])


# --------------------------------------------------------------------- N = 1


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "mask_kind", ["none", "none-causal", "bool-true", "bool-false", "zero", "-inf", "min"]
)
@pytest.mark.parametrize("h,hkv", [(4, 2), (2, 2)])
def test_one_token(dtype, mask_kind, h, hkv):
    """N = 1: the value itself, or SDPA's convention when the one key is masked."""
    dt = DTYPES[dtype]
    q, k, v = qkv(2, h, hkv, 1, 1, 8, seed=4, dtype=dt, logit=1e4 if dtype == "fp32" else None)
    causal = mask_kind == "none-causal"
    mask = {
        "none": None,
        "none-causal": None,
        "bool-true": torch.ones(1, 1, 1, 1, dtype=torch.bool),
        "bool-false": torch.zeros(2, 1, 1, 1, dtype=torch.bool),
        "zero": torch.zeros(1, 1, 1, 1, dtype=dt),
        "-inf": torch.full((2, 1, 1, 1), -math.inf, dtype=dt),
        "min": torch.full((2, 1, 1, 1), torch.finfo(dt).min, dtype=dt),
    }[mask_kind]
    ref = sdpa(q, k, v, mask, causal=causal)
    for budget in (1.0, 0.25):
        out, rec = call(q, k, v, mask, causal=causal, budget=budget)
        assert out.shape == ref.shape and out.dtype == dt
        assert torch.equal(out, ref), f"budget {budget}: {rec}: {out.flatten()} != {ref.flatten()}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("nk", [1, 5, TILE, 3 * TILE + 1])
def test_one_decoding_query(dtype, nk):
    """A single query (the last position) against 1..several tiles of keys, causal mask form
    of a cache (all keys visible), huge logits in fp32: finite and SDPA on the exact path."""
    dt = DTYPES[dtype]
    logit = 1e4 if dtype == "fp32" else None
    q, k, v = qkv(1, 4, 2, 1, nk, 16, seed=nk, dtype=dt, logit=logit)
    mask = torch.ones(1, 1, 1, nk, dtype=torch.bool)
    ref = sdpa(q, k, v, mask)
    gold = sdpa(q.double(), k.double(), v.double(), mask)
    for budget in (1.0, 0.25):
        out, rec = call(q, k, v, mask, budget=budget)
        assert bool(torch.isfinite(out).all()), rec
        assert in_value_range(out, v)
        if rec["path"] == "exact":
            assert_golden(out, gold, ref, f"{rec}")


# --------------------------------------------------------------------- long N in half precision


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_long_sequence_half_precision(dtype):
    """N = 4096 at budget 0.25 (tile 64: pooled and STATE tiles), causal with left padding
    as a ``finfo.min`` mask (what HF hands SDPA in half precision), logits up to about 30:
    finite wherever SDPA is, within the values' range; the padded (empty) rows and the near
    field as SDPA."""
    dt = DTYPES[dtype]
    n, pad = 4096, 1000
    q, k, v = qkv(2, 2, 1, n, n, 32, seed=7, dtype=dt, logit=30.0)
    allowed = allowed_mask(2, n, n, causal=True)
    allowed[1, :, :, :pad] = False
    mask = as_form(allowed, "min", dt)  # padded queries: empty rows, recomputed exactly
    ref = sdpa(q, k, v, mask)
    gold = sdpa(q[1:, :, :pad].double(), k[1:].double(), v[1:].double(), mask[1:, :, :pad].double())
    out, rec = call(q, k, v, mask, budget=0.25, tile=64, features=32)
    assert rec["path"] == "tiled" and rec["reads_per_query"] < rec["exact_reads_per_query"]
    finite = torch.isfinite(ref)
    assert bool(finite.all())
    assert bool(torch.isfinite(out).all()), "NaN/inf where SDPA is finite"
    assert in_value_range(out, v)
    assert_golden(out[1, :, :pad], gold[0], ref[1, :, :pad], "empty rows")
    # the first two tiles are the near field of every query in them: exact there
    near = 2 * 64
    gold0 = sdpa(
        q[:1, :, :near].double(), k[:1].double(), v[:1].double(), mask[:1, :, :near].double()
    )
    assert_golden(out[:1, :, :near], gold0, ref[:1, :, :near], "near field")
