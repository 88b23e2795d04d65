"""The SDPA finder, at the Dynamo level (torch.compile) and the ATen level (torch.export)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanite_compile.config import NaniteConfig
from nanite_compile.kernels.ops import recording
from nanite_compile.passes import PassContext, run_passes

B, H, HKV, N, D = 2, 4, 2, 40, 16


class SDPA(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


def qkv(hkv=H, n=N):
    return torch.randn(B, H, n, D), torch.randn(B, hkv, n, D), torch.randn(B, hkv, n, D)


def allowed_mask(n=N, pad=7):
    """``[B, 1, N, N]`` bool: causal, the last ``pad`` keys of batch element 1 are padding."""
    key_valid = torch.ones(B, n, dtype=torch.bool)
    key_valid[1, n - pad :] = False
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None] & key_valid[:, None, None, :]


def additive(allowed):
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


CASES = {
    "causal": (dict(is_causal=True), lambda: (*qkv(),)),
    "bool_mask": (dict(), lambda: (*qkv(), allowed_mask())),
    "additive_mask": (dict(), lambda: (*qkv(), additive(allowed_mask()))),
    "gqa_scale": (dict(is_causal=True, enable_gqa=True, scale=0.3), lambda: (*qkv(hkv=HKV),)),
}
MASK_KIND = {
    "causal": "causal",
    "bool_mask": "dense-bool",
    "additive_mask": "dense-additive",
    "gqa_scale": "causal",
}


@pytest.mark.parametrize("case", list(CASES))
def test_dynamo_level_rewritten(case, compile_nanite, assert_close_to_fp64):
    kw, make_args = CASES[case]
    mod, args = SDPA(**kw), make_args()
    with recording() as store:
        backend, out = compile_nanite(mod, *args)
    assert backend.counters.get("found_sdpa") == 1 and backend.counters.get("rewritten") == 1
    (site,) = backend.sites
    assert (site.status, site.pattern, site.mask_kind) == ("rewritten", "sdpa", MASK_KIND[case])
    (records,) = store.values()
    assert records[0]["k_shape"] == list(args[1].shape)  # GQA: the op reads k/v unrepeated
    assert_close_to_fp64(mod, args, None, out)


@pytest.mark.parametrize(
    "kw, make_args, reason",
    [
        (dict(dropout_p=0.1), lambda: (*qkv(),), "dropout_p"),
        (dict(is_causal=True), lambda: (*qkv(), allowed_mask()), "is_causal together"),
    ],
    ids=["dropout", "causal_and_mask"],
)
def test_dynamo_level_skipped_with_reason(kw, make_args, reason, compile_nanite):
    mod, args = SDPA(**kw), make_args()
    backend, _ = compile_nanite(mod, *args)
    (site,) = backend.sites
    assert site.status == "skipped" and reason in site.reason
    assert backend.counters.get("rewritten", 0) == 0


@pytest.mark.parametrize("case", ["causal", "bool_mask", "gqa_scale"])
def test_aten_level_after_export(case, assert_close_to_fp64):
    kw, make_args = CASES[case]
    mod, args = SDPA(**kw), make_args()
    ep = torch.export.export(mod, args)
    gm = ep.module()
    sdpa = [
        n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
    ]
    assert len(sdpa) == 1 and isinstance(sdpa[0].meta["val"], torch.Tensor)  # export meta: "val"
    ctx = PassContext(NaniteConfig(budget=1.0))
    matches = run_passes(gm, ctx)
    assert [(m.pattern, m.skip_reason) for m in matches] == [("aten_sdpa", None)]
    assert ctx.counters == {"found_aten_sdpa": 1, "rewritten": 1}
    assert not any(
        n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes
    )
    with torch.no_grad():
        out = gm(*args)
    assert_close_to_fp64(mod, args, None, out)
