"""Capture behaviour of convert() and the nanite backend: recompiles, nesting, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanite_compile as nc
from nanite_compile.backend import NaniteBackend

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[hf]')")
from tiny_models import tiny_llama  # noqa: E402  (after the importorskip)


def _tiny_llama(layers: int = 2):
    return tiny_llama(vocab=97, hidden=64, layers=layers, max_pos=1024, impl="sdpa")


class SDPABlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, n, d)


def test_new_lengths_do_not_recompile():
    model = _tiny_llama()
    conv = nc.convert(model, budget=0.25, config=nc.NaniteConfig(tile=16))
    state = conv.__dict__["_nanite_state"]
    with torch.no_grad():
        conv(torch.randint(0, 97, (1, 200)))
        before = {p: be.graphs for p, be in state.backends.items()}
        for n in (233, 301, 417, 90):
            out = conv(torch.randint(0, 97, (1, n))).logits
            assert out.shape[1] == n and torch.isfinite(out).all()
    after = {p: be.graphs for p, be in state.backends.items()}
    assert after == before, "a new sequence length recompiled an attention module"


def test_outer_compile_of_converted_model_keeps_the_rewrite():
    model = _tiny_llama()
    conv = nc.convert(model, budget=0.25, config=nc.NaniteConfig(tile=16))
    x = torch.randint(0, 97, (1, 300))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        expect = conv(x).logits
        got = torch.compile(conv, backend=capture)(x).logits
        orig = model(x).logits
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.nanite.tiled_attention in targets or \
        torch.ops.nanite.tiled_attention.default in targets
    assert F.scaled_dot_product_attention not in targets
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    assert (got - orig).abs().max() > 1e-4  # the tiled attention really ran


def test_gradients_flow_through_the_tiled_op():
    model = _tiny_llama()
    conv = nc.convert(model, budget=0.25, config=nc.NaniteConfig(tile=16)).train()
    x = torch.randint(0, 97, (1, 160))
    loss = conv(x, labels=x).loss
    loss.backward()
    g = model.model.layers[0].self_attn.q_proj.weight.grad  # parameters are shared
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_backend_fullgraph_counts_rewrites_and_leaves_other_softmax_alone():
    torch.manual_seed(0)
    block = SDPABlock().eval()
    backend = NaniteBackend(nc.NaniteConfig(budget=1.0), inner="eager")
    x = torch.randn(2, 70, 32)
    out = torch.compile(block, backend=backend, fullgraph=True, dynamic=True)(x)
    torch.testing.assert_close(out, block(x))
    assert backend.counters.get("rewritten") == 1

    head = nn.Sequential(nn.Linear(32, 10), nn.Softmax(dim=-1))
    be2 = NaniteBackend(nc.NaniteConfig(budget=0.25), inner="eager")
    torch.compile(head, backend=be2, fullgraph=True)(x)
    assert be2.counters.get("rewritten", 0) == 0 and be2.sites == []


def test_backend_inductor_path_runs_the_op():
    torch.manual_seed(0)
    block = SDPABlock().eval()
    x = torch.randn(1, 150, 32)
    compiled = torch.compile(block, backend="nanite", options={"budget": 0.25, "tile": 16})
    with torch.no_grad():
        out = compiled(x)
    assert torch.isfinite(out).all()
    rep = nc.report(compiled)
    assert [s.status for s in rep.sites] == ["rewritten"]


def test_backend_rejects_unknown_options():
    block = SDPABlock().eval()
    compiled = torch.compile(block, backend="nanite", options={"budjet": 0.25})
    with pytest.raises(Exception, match="budjet"):
        compiled(torch.randn(1, 8, 32))
