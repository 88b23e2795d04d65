"""Finder regressions found by the differential suite (tests/test_differential.py).

- Falcon's eager attention scales its scores in place (``scores /= sqrt(d)``);
  Dynamo records the augmented assignment as ``operator.itruediv``, which the
  finder did not follow: the site was not found at all (no report entry). It is
  now matched, and the in-place operator, private to the chain, is dropped with
  it by the rewrite.
- T5 hands its relative position bias from the first layer to the others, as an
  argument: an additive term that is a graph input. Its captured value holds
  values other than 0 and -inf, so it is a bias, and the site is skipped with
  that reason (eager and SDPA alike) instead of being reported as rewritten.
- SDPA with a bias derived from parameters (T5's first layer) is skipped as the
  eager finder skips it; before, SDPA sites never looked at their float mask.
- Falcon's ALiBi eager path views the scores and the probabilities to their own
  shape (``x.view(b, h, q, k)``) between the products and the softmax: the chain
  was not followed through them, so the site was not reported at all.
- One key/value head broadcast over the query heads in SDPA without
  ``enable_gqa`` (Falcon's multi-query attention) is GQA with one group:
  rewritten, where it was skipped.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanite_compile.backend import NaniteBackend
from nanite_compile.config import NaniteConfig

B, H, N, D = 2, 4, 40, 16


def qkv():
    return torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)


def causal_additive():
    allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    allowed[1, :, :, :5] = False  # left padding of batch element 1
    allowed[1, :, :5, 0] = True  # (padded queries keep one key, as HF masks leave them)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


class InplaceDivide(nn.Module):
    """Falcon (``new_decoder_architecture``) eager attention: ``/=`` then ``softmax(s + mask)``."""

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2)
        s /= math.sqrt(q.shape[-1])
        p = F.softmax(s + mask, dim=-1, dtype=q.dtype)
        return p @ v


class InplaceAdd(nn.Module):
    """``s *= scale; s += mask``: the mask added in place."""

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2))
        s *= 0.25
        s += mask
        return torch.matmul(s.softmax(-1), v)


def compile_and_keep_graph(mod, *args, budget=1.0):
    backend = NaniteBackend(NaniteConfig(budget=budget, tile=16), inner="eager")
    graphs = []

    def keep(gm, example_inputs):
        out = backend(gm, example_inputs)
        graphs.append(gm)
        return out

    compiled = torch.compile(mod, backend=keep, dynamic=True, fullgraph=True)
    with torch.no_grad():
        out = compiled(*args)
    return backend, graphs, out


@pytest.mark.parametrize("mod", [InplaceDivide(), InplaceAdd()], ids=["itruediv", "iadd_imul"])
def test_inplace_operators_in_the_chain(mod, assert_close_to_fp64):
    q, k, v = qkv()
    mask = causal_additive()
    backend, graphs, out = compile_and_keep_graph(mod, q, k, v, mask)
    assert len(backend.sites) == 1, backend.sites
    site = backend.sites[0]
    assert (site.status, site.pattern) == ("rewritten", "eager"), site.reason
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)
    # the score product and its in-place scaling went with the chain
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.nanite.tiled_attention.default in targets
    assert not set(targets) & {operator.matmul, torch.matmul, operator.itruediv, operator.iadd,
                               operator.imul}, targets  # fmt: skip
    # and at a low budget the tiled path runs on it
    backend, _, out = compile_and_keep_graph(mod, q, k, v, mask, budget=0.25)
    assert backend.sites[0].status == "rewritten" and torch.isfinite(out).all()


class EagerWithBias(nn.Module):
    """T5's later layers: the position bias arrives as an argument and is added to the scores."""

    def forward(self, q, k, v, position_bias):
        s = torch.matmul(q, k.transpose(2, 3)) + position_bias
        return torch.matmul(F.softmax(s, dim=-1), v)


class SDPAWithBias(nn.Module):
    def forward(self, q, k, v, position_bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)


class SDPAWithLearnedBias(nn.Module):
    """T5's first layer under SDPA: the bias comes from an embedding of relative positions."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(2 * N, H)

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(n, device=q.device)
        bias = self.rel(pos[None, :] - pos[:, None] + N).permute(2, 0, 1)[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def relative_bias():
    i = torch.arange(N)
    return (-0.1 * (i[None, :] - i[:, None]).abs().float())[None, None].expand(1, H, N, N)


@pytest.mark.parametrize("mod", [EagerWithBias(), SDPAWithBias()], ids=["eager", "sdpa"])
def test_bias_handed_in_is_skipped(mod, compile_nanite, assert_close_to_fp64):
    q, k, v = qkv()
    bias = relative_bias().contiguous()
    backend, out = compile_nanite(mod, q, k, v, bias, budget=0.25, tile=16)
    (site,) = backend.sites
    assert site.status == "skipped"
    assert "handed in by the caller" in site.reason and "not provably a mask" in site.reason
    assert_close_to_fp64(mod, (q, k, v, bias), None, out)


@pytest.mark.parametrize("mod", [EagerWithBias(), SDPAWithBias()], ids=["eager", "sdpa"])
def test_mask_handed_in_is_still_rewritten(mod, compile_nanite, assert_close_to_fp64):
    """The same argument holding a mask (0 and finfo.min) is read by the op at run time."""
    q, k, v = qkv()
    mask = causal_additive()
    backend, out = compile_nanite(mod, q, k, v, mask, tile=16)
    (site,) = backend.sites
    assert site.status == "rewritten", site.reason
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)


def test_sdpa_bias_from_parameters_is_skipped(compile_nanite, assert_close_to_fp64):
    mod = SDPAWithLearnedBias()
    q, k, v = qkv()
    backend, out = compile_nanite(mod, q, k, v, budget=0.25, tile=16)
    (site,) = backend.sites
    assert site.status == "skipped" and "derived from parameters" in site.reason
    assert_close_to_fp64(mod, (q, k, v), None, out)


class SameShapeViews(nn.Module):
    """Falcon (ALiBi path): ``(q @ kT).view(b, h, n, n)`` ... ``softmax(...).view(b, h, n, n) @ v``."""

    def forward(self, q, k, v, mask):
        b, h, n, _ = q.shape
        s = (q @ k.transpose(-1, -2)).view(b, h, n, n)
        s *= 0.25
        p = F.softmax(s + mask, dim=-1, dtype=q.dtype)
        p = F.dropout(p, 0.0, False, False).view(b, h, n, n)
        return p @ v


def test_same_shape_views_in_the_chain(assert_close_to_fp64):
    mod = SameShapeViews()
    q, k, v = qkv()
    mask = causal_additive()
    backend, graphs, out = compile_and_keep_graph(mod, q, k, v, mask)
    (site,) = backend.sites
    assert site.status == "rewritten", site.reason
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)


class BroadcastOneHead(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_one_kv_head_broadcast(compile_nanite, assert_close_to_fp64):
    mod = BroadcastOneHead()
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, 1, N, D), torch.randn(B, 1, N, D)
    backend, out = compile_nanite(mod, q, k, v, tile=16)
    (site,) = backend.sites
    assert site.status == "rewritten", site.reason
    assert_close_to_fp64(mod, (q, k, v), None, out)
    backend, out = compile_nanite(mod, q, k, v, tile=16, budget=0.25)
    assert backend.sites[0].status == "rewritten" and torch.isfinite(out).all()
