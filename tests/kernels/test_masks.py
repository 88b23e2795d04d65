"""Reading dense attention masks as structure, and the operator under those masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanite_compile.kernels import cpu
from nanite_compile.kernels.levels import TileParams
from nanite_compile.kernels.masks import read_mask
from nanite_compile.kernels.reference import exact_attention, tiled_attention

B, H, HKV, N, D = 2, 4, 2, 200, 16
PAD = 23  # padding tokens of batch 1


def allowed_mask(n, causal, window, pad, nq=None):
    """``[B, 1, Nq, N]`` bool mask written out (not through the module under test)."""
    nq = n if nq is None else nq
    qpos = torch.arange(n - nq, n)[:, None]
    kpos = torch.arange(n)[None, :]
    allowed = torch.ones(nq, n, dtype=torch.bool)
    if causal:
        allowed &= kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    valid = torch.ones(B, n, dtype=torch.bool)
    if pad == "left":
        valid[1, :PAD] = False
    elif pad == "right":
        valid[1, n - PAD :] = False
    return allowed[None, None] & valid[:, None, None, :], (None if pad is None else valid)


def additive(allowed, fill, dtype=torch.float32):
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, fill)


STRUCTURES = [
    # causal, window, padding
    (True, None, None),
    (True, None, "left"),
    (True, None, "right"),
    (True, 40, None),
    (True, 40, "left"),
    (True, 40, "right"),
    (False, None, "left"),
    (False, None, "right"),
]
FORMS = ["bool", "finfo.min", "-inf", "bf16-min"]


def as_form(allowed, form):
    if form == "bool":
        return allowed
    if form == "finfo.min":
        return additive(allowed, torch.finfo(torch.float32).min)
    if form == "-inf":
        return additive(allowed, -math.inf)
    return additive(allowed, torch.finfo(torch.bfloat16).min, torch.bfloat16)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal,window,pad", STRUCTURES)
def test_read_mask_recovers_structure(causal, window, pad, form):
    allowed, valid = allowed_mask(N, causal, window, pad)
    st = read_mask(as_form(allowed, form), N, N, B)
    assert st is not None
    assert st.causal == causal and st.window == window
    if valid is None:
        assert st.key_valid is None
    else:
        assert torch.equal(st.key_valid, valid)
    empty = ~allowed[:, 0].any(-1)  # [B, N] rows with no key at all
    if form in ("finfo.min", "bf16-min") and bool(empty.any()):
        # SDPA averages all values on such a row (finite mask): only exact rows do that
        assert st.bad_rows is not None and torch.equal(st.bad_rows, empty)
    else:
        assert st.bad_rows is None


@pytest.mark.parametrize("shape", ["2d", "3d", "heads"])
def test_read_mask_broadcast_shapes(shape):
    """``[N, N]``, ``[1, N, N]`` and ``[B, H, N, N]`` with equal heads read the same."""
    allowed, _ = allowed_mask(N, True, 40, None)
    m = {"2d": allowed[0, 0], "3d": allowed[0], "heads": allowed.expand(B, H, N, N)}[shape]
    st = read_mask(m, N, N, B)
    assert st is not None and st.causal and st.window == 40
    assert st.key_valid is None and st.bad_rows is None


def test_read_mask_decode_row():
    """One query at the end of the keys with left padding: causal, padding read."""
    allowed, valid = allowed_mask(N, True, None, "left", nq=1)
    st = read_mask(additive(allowed, torch.finfo(torch.float32).min), 1, N, B)
    assert st is not None and st.causal and st.window is None and st.bad_rows is None
    assert torch.equal(st.key_valid, valid)


def test_read_mask_flags_rows_it_cannot_express():
    """Rows that deviate from the structure (within causality) are bad rows, the rest is read."""
    allowed, valid = allowed_mask(N, True, None, "left")
    allowed = allowed.clone()
    allowed[0, :, 150, 10] = False  # one key hidden from one query
    allowed[1, :, 60, 60] = False  # a query that may not see itself
    st = read_mask(allowed, N, N, B)
    assert st is not None and st.causal and st.window is None
    assert torch.equal(st.key_valid, valid)
    want = torch.zeros(B, N, dtype=torch.bool)
    want[0, 150] = True
    want[1, 60] = True
    assert torch.equal(st.bad_rows, want)


def test_read_mask_rejects_biases_and_head_masks():
    i = torch.arange(N)
    alibi = -0.25 * (i[:, None] - i[None, :]).abs().float()
    assert read_mask(alibi, N, N, B) is None
    causal_alibi = alibi.masked_fill(i[None, :] > i[:, None], -math.inf)
    assert read_mask(causal_alibi, N, N, B) is None
    small = additive(allowed_mask(N, True, None, None)[0], -100.0)  # not "blocked": a bias
    assert read_mask(small, N, N, B) is None
    a1, _ = allowed_mask(N, True, 40, None)
    a2, _ = allowed_mask(N, True, 80, None)
    per_head = torch.cat([a1, a2], 1).expand(B, 2, N, N).repeat(1, 2, 1, 1)
    assert read_mask(per_head, N, N, B) is None
    assert read_mask(torch.ones(N, N, dtype=torch.int64), N, N, B) is None


# ---------------------------------------------------------------------------
# the operator under masks


def qkv(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, HKV, N, D, generator=g)
    v = torch.randn(B, HKV, N, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa(q, k, v, mask):
    if mask.is_floating_point():
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)


def assert_golden(out, golden, baseline, factor=4.0):
    assert bool(torch.isfinite(out).all())
    err = (out.double() - golden).abs().max().item()
    base = (baseline.double() - golden).abs().max().item()
    floor = torch.finfo(out.dtype).eps * max(1.0, golden.abs().max().item())
    assert err <= factor * base + floor, f"error {err:.3e} vs reference error {base:.3e}"


def params(budget=0.25, budget_reads=None):
    return TileParams(
        tile=16,
        window=2,
        anchors=1,
        horizon=None,
        budget=budget,
        budget_reads=budget_reads,
        state_features=16,
    )


@pytest.mark.parametrize("fast", [None, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize(
    "causal,window,pad,form",
    [(*s, ("bool", "finfo.min", "-inf")[i % 3]) for i, s in enumerate(STRUCTURES)],
)
def test_all_exact_under_mask_is_sdpa(causal, window, pad, form, fast):
    """A tiled run whose table is all EXACT (absolute budget above exact) equals masked SDPA."""
    q, k, v = qkv(1)
    mask = as_form(allowed_mask(N, causal, window, pad)[0], form)
    st = {}
    out = tiled_attention(
        q,
        k,
        v,
        mask,
        scale=D**-0.5,
        is_causal=False,
        params=params(budget_reads=10**9),
        stats=st,
        fast=fast,
    )
    assert st["path"] == "tiled" and bool((st["levels"] <= 0).all())
    golden = sdpa(q.double(), k.double(), v.double(), mask)
    assert_golden(out, golden, sdpa(q, k, v, mask))


@pytest.mark.parametrize("fast", [None, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("causal,window,pad", STRUCTURES)
def test_budgeted_under_mask(causal, window, pad, fast):
    """At budget 0.25: tiled, finite, exactly-computed rows equal SDPA's, padded keys unseen."""
    q, k, v = qkv(2)
    allowed, valid = allowed_mask(N, causal, window, pad)
    allowed = allowed.clone()
    allowed[0, :, 150, 140] = False  # an irregular row, repaired exactly
    mask = additive(allowed, torch.finfo(torch.float32).min)
    st = {}
    out = tiled_attention(
        q,
        k,
        v,
        mask,
        scale=D**-0.5,
        is_causal=False,
        params=params(),
        stats=st,
        fast=fast,
    )
    assert st["path"] == "tiled" and bool(torch.isfinite(out).all())
    ref = exact_attention(q, k, v, mask, D**-0.5, False)
    bad = read_mask(mask, N, N, B).bad_rows
    assert bad is not None and bool(bad[0, 150])
    torch.testing.assert_close(out.transpose(1, 2)[bad], ref.transpose(1, 2)[bad])
    if causal:  # the first tile sees only itself, always EXACT: exact attention there
        torch.testing.assert_close(out[:, :, :16], ref[:, :, :16])
    if valid is not None:  # padding keys carry no weight: changing them changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[1, :, ~valid[1]] = 50.0
        v2[1, :, ~valid[1]] = 1e6
        out2 = tiled_attention(
            q, k2, v2, mask, scale=D**-0.5, is_causal=False, params=params(), fast=fast
        )
        rows = allowed[:, 0].any(-1)
        torch.testing.assert_close(out2.transpose(1, 2)[rows], out.transpose(1, 2)[rows])


def test_mask_fallbacks():
    """A bias, or a structure that explains too few rows, runs exact attention with the mask."""
    q, k, v = qkv(3)
    i = torch.arange(N)
    alibi = (-0.25 * (i[:, None] - i[None, :]).abs().float()).masked_fill(
        i[None, :] > i[:, None], -math.inf
    )
    allowed, _ = allowed_mask(N, True, None, None)
    irregular = allowed.clone()
    irregular[:, :, ::2, 0] = False  # half of the rows hide key 0
    # old HF style: padded queries attend to every key, future ones included
    unmasked, _ = allowed_mask(N, True, None, "left")
    unmasked = unmasked.clone()
    unmasked[1, :, :PAD] = True
    for mask, reason in ((alibi, "bias"), (irregular, "too few rows"), (unmasked, "too few rows")):
        st = {}
        out = tiled_attention(
            q, k, v, mask, scale=D**-0.5, is_causal=False, params=params(), stats=st
        )
        assert st["path"] == "exact" and reason in st["reason"]
        torch.testing.assert_close(out, sdpa(q, k, v, mask))


def test_a_described_window_reads_back():
    """NaniteCache reads a site's measured window from its report's mask name."""
    from nanite_compile.kernels.masks import MaskStructure

    for window, valid in [(64, None), (40, torch.ones(1, 8, dtype=torch.bool))]:
        name = MaskStructure(True, window, valid, None).describe()
        assert MaskStructure.window_of(name) == window, name
    assert MaskStructure.window_of(MaskStructure(True, None, None, None).describe()) is None
    assert MaskStructure.window_of("") is None
