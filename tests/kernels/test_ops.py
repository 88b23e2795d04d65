"""The registered op ``torch.ops.nanite.tiled_attention``: schema, fake, autograd, records."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanite_compile.kernels import ops
from nanite_compile.kernels.levels import STATE, TileParams
from nanite_compile.kernels.reference import (
    exact_attention,
    random_features,
    tiled_attention,
    tiled_attention_from_levels,
)

OP = torch.ops.nanite.tiled_attention.default


def plan(
    budget=0.25,
    tile=8,
    window=1,
    anchors=1,
    horizon=-1,
    budget_reads=0,
    features=2,
    seed=0,
    site="site",
):
    """The op's plan arguments after ``is_causal``, in schema order."""
    return (tile, window, anchors, horizon, budget, budget_reads, features, seed, site)


def as_params(
    budget=0.25,
    tile=8,
    window=1,
    anchors=1,
    horizon=-1,
    budget_reads=0,
    features=2,
    seed=0,
    site="site",
):
    return TileParams(
        tile=tile,
        window=window,
        anchors=anchors,
        horizon=None if horizon < 0 else horizon,
        budget=budget,
        budget_reads=None if budget_reads <= 0 else budget_reads,
        state_features=features,
    )


def qkv(b, h, hkv, nq, nk, d, seed, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def causal_padded_mask(b, n, pad, additive=False):
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    allowed[-1, :, :, :pad] = False
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
        ~allowed, torch.finfo(torch.float64).min
    )


def assert_golden(out, golden, baseline, factor=4.0):
    assert bool(torch.isfinite(out).all())
    err = (out.double() - golden).abs().max().item()
    base = (baseline.double() - golden).abs().max().item()
    floor = torch.finfo(out.dtype).eps * max(1.0, golden.abs().max().item())
    assert err <= factor * base + floor, f"error {err:.3e} vs reference error {base:.3e}"


MASKS = {
    "none": lambda: (None, True),
    "bool": lambda: (causal_padded_mask(2, 40, 5), False),
    "additive": lambda: (causal_padded_mask(2, 40, 5, additive=True), False),
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_opcheck(mask_kind):
    """Schema, fake tensor, autograd registration and AOT dispatch (fp64, with grads)."""
    mask, is_causal = MASKS[mask_kind]()
    q, k, v = qkv(2, 4, 2, 40, 40, 8, seed=0, requires_grad=True)
    st = {}
    tiled_attention(
        q.detach(),
        k.detach(),
        v.detach(),
        mask,
        scale=8**-0.5,
        is_causal=is_causal,
        params=as_params(),
        stats=st,
    )
    assert st["path"] == "tiled" and bool((st["levels"] == STATE).any())  # a real tiled plan
    torch.library.opcheck(OP, (q, k, v, mask, 8**-0.5, is_causal, *plan()))


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_gradcheck(mask_kind):
    """Gradients of the tiled plan (EXACT, POOL and STATE tiles) against finite differences."""
    mask, is_causal = MASKS[mask_kind]()
    b = 1 if mask is None else 2
    q, k, v = qkv(b, 2, 1, 40, 40, 8, seed=1, requires_grad=True)

    def f(q, k, v):
        return OP(q, k, v, mask, 8**-0.5, is_causal, *plan())

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_backward_is_the_reference_gradient():
    """The backward op returns autograd's gradient of the reference tiled computation."""
    q, k, v = qkv(1, 4, 2, 64, 64, 8, seed=2, requires_grad=True)
    grad = torch.randn(1, 4, 64, 8, dtype=torch.float64)
    out = OP(q, k, v, None, 8**-0.5, True, *plan())
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = tiled_attention(q, k, v, None, scale=8**-0.5, is_causal=True, params=as_params())
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_double_backward_is_a_clear_error():
    """A second derivative was 'no autograd formula was registered' for the backward op;
    it now says what is supported. The first derivative with create_graph still works."""
    q, k, v = qkv(1, 4, 2, 40, 40, 16, seed=3, requires_grad=True)
    out = OP(q, k, v, None, 0.25, True, *plan(0.25, tile=8))
    gq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    assert torch.isfinite(gq).all()
    with pytest.raises(NotImplementedError, match="first derivative only"):
        torch.autograd.grad(gq.sum(), q)


def test_compiles_fullgraph_with_backward():
    """One opaque call under ``torch.compile(fullgraph=True)``: same values and gradients."""
    q, k, v = qkv(1, 4, 2, 40, 40, 8, seed=3, requires_grad=True)

    def f(q, k, v):
        return OP(q, k, v, None, 8**-0.5, True, *plan()).sin().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b)


def test_op_matches_the_reference_arithmetic():
    """The op (fast CPU path) against the reference on the same level table, golden scheme."""
    q, k, v = qkv(2, 4, 2, 300, 300, 16, seed=4, dtype=torch.float32)
    mask = causal_padded_mask(2, 300, 37)
    params = as_params(0.25, tile=16, window=2, features=8)
    st = {}
    base = tiled_attention(q, k, v, mask, scale=0.25, is_causal=False, params=params, stats=st)
    lv = st["levels"]
    assert bool((lv == STATE).any()) and bool((lv > 0).any())
    out = OP(q, k, v, mask, 0.25, False, *plan(0.25, tile=16, window=2, features=8))
    valid = mask[:, 0].any(1)
    proj = random_features(16, 8, 2, 0, "cpu", torch.float32).double()  # as the fp32 run
    golden = tiled_attention_from_levels(
        q.double(),
        k.double(),
        v.double(),
        lv,
        scale=0.25,
        causal=True,
        tile=16,
        key_valid=valid,
        feature_proj=proj,
    )
    rows = mask[:, 0].any(-1)  # rows with no key at all are 0 in every path
    golden = golden.masked_fill(~rows[:, None, :, None], 0.0)
    assert_golden(out, golden, base)


def test_inference_mode_then_outside():
    """The CPU path's reusable scratch, first grown under torch.inference_mode(), stays
    writable after it (it was an inference tensor: every later call outside failed)."""
    import threading

    def run(out):
        q, k, v = qkv(1, 4, 2, 300, 300, 16, seed=4, dtype=torch.float32)
        args = (q, k, v, None, 0.25, True, *plan(0.25, tile=16, window=2, features=8))
        with torch.inference_mode():
            out.append(OP(*args))
        with torch.no_grad():
            out.append(OP(*args))
        out.append(OP(*args))

    outs: list = []
    t = threading.Thread(target=run, args=(outs,))  # a fresh thread: a fresh scratch
    t.start()
    t.join()
    assert len(outs) == 3 and all(torch.equal(o, outs[0]) for o in outs[1:])


def test_recording():
    """Per-site records: path, reason, reads against the original, relative error."""
    q, k, v = qkv(1, 4, 2, 256, 256, 16, seed=5, dtype=torch.float32)
    args = (q, k, v, None, 0.25, True)
    with ops.recording(measure_error=True) as rec:
        OP(*args, *plan(0.25, tile=16, window=2, features=8, site="layers.0.attn"))
        OP(*args, *plan(0.25, tile=16, window=2, features=8, site="layers.0.attn"))
        OP(*args, *plan(1.0, tile=16, site="layers.1.attn"))
    assert set(rec) == {"layers.0.attn", "layers.1.attn"}
    assert len(rec["layers.0.attn"]) == 2
    r = rec["layers.0.attn"][0]
    assert r["path"] == "tiled" and r["q_shape"] == [1, 4, 256, 16]
    assert 0 < r["reads_per_query"] < r["exact_reads_per_query"]
    ref = exact_attention(q, k, v, None, 0.25, True)
    out = OP(*args, *plan(0.25, tile=16, window=2, features=8))
    want = float((out - ref).norm() / ref.norm())
    assert r["rel_error"] == pytest.approx(want, rel=1e-5) and r["rel_error"] > 0
    e = rec["layers.1.attn"][0]
    assert e["path"] == "exact" and "budget" in e["reason"] and e["rel_error"] == 0.0

    with ops.recording() as rec2:  # error measured only on request
        OP(*args, *plan(0.25, tile=16, window=2, features=8))
    assert "rel_error" not in rec2["site"][0]
    OP(*args, *plan(0.25, tile=16, window=2, features=8, site="outside"))
    assert "outside" not in rec and "outside" not in rec2


@pytest.mark.parametrize("padded", [False, True])
def test_decode(padded):
    """One query against 200 keys (is_causal False, SDPA's decode call)."""
    q, k, v = qkv(2, 4, 2, 1, 200, 16, seed=6, dtype=torch.float32)
    mask = None
    if padded:
        mask = torch.ones(2, 1, 1, 200, dtype=torch.bool)
        mask[1, ..., :31] = False
    golden = exact_attention(q.double(), k.double(), v.double(), mask, 0.25, False)
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    with ops.recording() as rec:
        exact = OP(q, k, v, mask, 0.25, False, *plan(1.0, tile=16, window=2))
        full = OP(q, k, v, mask, 0.25, False, *plan(1.0, tile=16, window=2, budget_reads=10**6))
        cheap = OP(q, k, v, mask, 0.25, False, *plan(0.25, tile=16, window=2, features=8))
    paths = [r["path"] for r in rec["site"]]
    assert paths == ["exact", "tiled", "tiled"], rec
    assert exact.shape == (2, 4, 1, 16)
    assert_golden(exact, golden, base)
    assert_golden(full, golden, base)  # tiled, every tile EXACT
    assert cheap.shape == (2, 4, 1, 16) and bool(torch.isfinite(cheap).all())
    assert rec["site"][2]["reads_per_query"] < rec["site"][2]["exact_reads_per_query"]


def test_impl_choice_is_honoured(monkeypatch):
    """``impl`` picks the implementation: ``torch`` runs PyTorch, ``triton`` the kernel
    (here under the interpreter) or a clear error, never a silent fallback."""
    q, k, v = qkv(1, 4, 2, 96, 96, 16, seed=7, dtype=torch.float32)
    args = (q, k, v, None, 0.25, True, *plan(0.25, tile=16, window=2, features=0, site="s"))
    with ops.recording() as rec:
        out_t = OP(*args, 6.0, "torch")
        out_a = OP(*args, 6.0, "auto")
    assert [r["impl"] for r in rec["s"]] == ["cpu", "cpu"]
    torch.testing.assert_close(out_t, out_a)

    triton_attn = pytest.importorskip("nanite_compile.kernels.triton_attn")
    if triton_attn.available() and triton_attn._interpreting():
        with ops.recording() as rec:
            out_k = OP(*args, 6.0, "triton")
        assert rec["s"][0]["impl"] == "triton_attn"
        torch.testing.assert_close(out_k, out_t, rtol=1e-4, atol=1e-4)
        # fp64 is not a Triton dtype: raised before any attention is computed, no fallback
        a64 = (q.double(), k.double(), v.double(), *args[3:])
        with pytest.raises(RuntimeError, match="does not take this call.*float64"):
            OP(*a64, 6.0, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|not installed"):
        OP(*args, 6.0, "triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        OP(*args, 6.0, "cuda")
