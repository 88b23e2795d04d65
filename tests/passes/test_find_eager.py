"""The eager-chain finder: hand-written attention in its common spellings.

Each test compiles a small module with the nanite backend (``fullgraph=True``,
dynamic shapes), then checks what the finder said (pattern, status, reason) and
that the compiled output equals the eager one within the fp64-derived tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanite_compile.backend import NaniteBackend
from nanite_compile.config import NaniteConfig
from nanite_compile.kernels.ops import recording
from nanite_compile.passes import PassContext, run_passes

B, H, HKV, N, D = 2, 4, 2, 24, 16


def qkv(b=B, h=H, hkv=H, n=N, d=D, scale=1.0):
    q = torch.randn(b, h, n, d) * scale
    k = torch.randn(b, hkv, n, d) * scale
    v = torch.randn(b, hkv, n, d)
    return q, k, v


def only_site(backend):
    assert len(backend.sites) == 1, backend.sites
    return backend.sites[0]


# ---------------------------------------------------------------- modules


class CausalSelfAttention(nn.Module):
    """nanoGPT: a ``tril`` buffer, ``masked_fill(bias == 0, -inf)``, scale on the scores."""

    def __init__(self, n_embd=32, n_head=4, block_size=256):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.register_buffer(
            "bias",
            torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size),
        )

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class EinsumAttention(nn.Module):
    def __init__(self, eq_scores, eq_out, scale=None):
        super().__init__()
        self.eq_scores, self.eq_out, self.scale = eq_scores, eq_out, scale

    def forward(self, q, k, v):
        s = torch.einsum(self.eq_scores, q, k)
        if self.scale is not None:
            s = s * self.scale
        return torch.einsum(self.eq_out, s.softmax(dim=-1), v)


def hf_repeat_kv(x, n_rep):
    b, hkv, n, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n_rep, n, d).reshape(b, hkv * n_rep, n, d)


class GQAAttention(nn.Module):
    """GQA as HF writes it (``repeat_kv``) or with ``repeat_interleave``."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        n_rep = q.shape[1] // k.shape[1]
        if self.how == "repeat_kv":
            k, v = hf_repeat_kv(k, n_rep), hf_repeat_kv(v, n_rep)
        else:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.1, training=self.training)
        return torch.matmul(w, v)


class ScaleBefore(nn.Module):
    """Scale on q (and on k, Whisper-style ``d**-0.25`` on both), ``k.mT``."""

    def __init__(self, both):
        super().__init__()
        self.both = both

    def forward(self, q, k, v):
        d = q.shape[-1]
        if self.both:
            q, k = q * d**-0.25, k * d**-0.25
        else:
            q = q * d**-0.5
        return torch.softmax(q @ k.mT, dim=-1) @ v


class DivAfter(nn.Module):
    """Division after the product, ``permute`` for kᵀ, softmax upcast and cast back."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(q.size(-1))
        p = torch.softmax(s.float(), dim=-1).type_as(q)
        return torch.matmul(p, v)


class WhereMask(nn.Module):
    def forward(self, q, k, v, allowed):
        s = q @ k.transpose(-2, -1) * 0.25
        s = torch.where(allowed, s, float("-inf"))
        return s.softmax(-1) @ v


class AdditiveMask(nn.Module):
    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1) * 0.25 + mask
        return s.softmax(-1) @ v


class BlockedFill(nn.Module):
    """``masked_fill(padding, finfo.min)`` with a padding mask built in the graph."""

    def forward(self, q, k, v, lengths):
        pad = torch.arange(k.shape[2])[None, :] >= lengths[:, None]  # [B, Nk] True = pad
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(pad[:, None, None, :], torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v


class FiniteBlockFill(nn.Module):
    """BERT-era ``masked_fill(~causal, -1e4)``: finite, so it blocks only while the
    logits stay well below 1e4."""

    def forward(self, q, k, v):
        n = q.shape[2]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(future, -1e4)
        return s.softmax(-1) @ v


class SoftCap(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        s = torch.tanh(s / 30.0) * 30.0
        return s.softmax(-1) @ v


class ALiBi(nn.Module):
    def __init__(self, heads=H):
        super().__init__()
        self.slopes = nn.Parameter(2.0 ** (-torch.arange(1, heads + 1, dtype=torch.float32)))

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(n)
        bias = self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).float()
        s = q @ k.transpose(-2, -1) * 0.25 + bias
        return s.softmax(-1) @ v


class RelativeBias(nn.Module):
    """T5-style: a learned embedding of the relative position, added to the scores."""

    def __init__(self, heads=H, buckets=8):
        super().__init__()
        self.rel = nn.Embedding(2 * buckets + 1, heads)
        self.buckets = buckets

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(n)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.buckets, self.buckets) + self.buckets
        bias = self.rel(rel).permute(2, 0, 1)[None]
        return (q @ k.transpose(-2, -1) + bias).softmax(-1) @ v


class ComputedBias(nn.Module):
    """A distance penalty computed in the graph from constants only (no parameters)."""

    def forward(self, q, k, v):
        pos = torch.arange(q.shape[2])
        bias = -(pos[None, :] - pos[:, None]).abs().float() * 0.5
        return (q @ k.transpose(-2, -1) * 0.25 + bias).softmax(-1) @ v


class ExtendedMask(nn.Module):
    """Older Hugging Face: ``(1.0 - attention_mask[:, None, None, :]) * finfo.min``."""

    def forward(self, q, k, v, attention_mask):
        ext = attention_mask[:, None, None, :].to(q.dtype)
        ext = (1.0 - ext) * torch.finfo(q.dtype).min
        return (q @ k.transpose(-2, -1) * 0.25 + ext).softmax(-1) @ v


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, 10)

    def forward(self, x):
        return F.softmax(self.head(x), dim=-1)


class ReturnsWeights(nn.Module):
    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return p @ v, p


class BmmSlowPath(nn.Module):
    """``F.multi_head_attention_forward``'s slow path: ``[B*H, N, D]``, ``baddbmm`` with a mask."""

    def forward(self, q, k, v, mask):
        q = q * math.sqrt(1.0 / q.shape[-1])
        w = torch.baddbmm(mask, q, k.transpose(-2, -1))
        return torch.bmm(torch.softmax(w, dim=-1), v)


class ClampedScores(nn.Module):
    """XGLM: the scores clamped from below by ``torch.max(w, finfo.min)`` before the softmax."""

    def forward(self, q, k, v):
        w = q @ k.transpose(-2, -1) * 0.25
        w = torch.max(w, torch.full((), torch.finfo(w.dtype).min, dtype=w.dtype))
        return w.softmax(-1) @ v


class EinsumClamped(nn.Module):
    """The same clamp with both products written as einsum."""

    def forward(self, q, k, v):
        w = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
        w = torch.clamp_min(w, -1e4)
        return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)


class ReshapedWeights(nn.Module):
    """Bloom / XGLM: ``[B*H, N, N]`` weights viewed as ``[B, H, N, N]`` and back around the
    mask and the softmax."""

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        w = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2))
        p = torch.softmax(w.view(b, h, n, n) * 0.25, dim=-1)
        return torch.bmm(p.view(b * h, n, n), v.reshape(b * h, n, d)).view(b, h, n, d)


class ProbsReshaped(nn.Module):
    """The weights reshaped to ``[B*H, N, N]`` for a ``bmm`` with v."""

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        p = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return torch.bmm(p.reshape(b * h, n, n), v.reshape(b * h, n, d)).view(b, h, n, d)


class SinkLogits(nn.Module):
    """GPT-OSS: a learned sink logit per head joins the scores, its column dropped after."""

    def __init__(self, h=H):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(h))

    def forward(self, q, k, v):
        w = q @ k.transpose(-2, -1) * 0.25
        s = self.sinks.reshape(1, -1, 1, 1).expand(w.shape[0], -1, w.shape[2], 1)
        p = torch.cat([w, s], dim=-1).softmax(-1)[..., :-1]
        return p @ v


class BaddbmmKeywords(nn.Module):
    """Bloom's spelling: ``bias.baddbmm(batch1=q, batch2=kT, beta=1.0, alpha=scale)``."""

    def forward(self, q, k, v, mask):
        w = mask.baddbmm(batch1=q, batch2=k.transpose(-2, -1), beta=1.0, alpha=0.25)
        return torch.bmm(torch.softmax(w, dim=-1), v)


class ScoresPlusZero(nn.Module):
    """DeBERTa without relative attention: ``scores + rel_att`` with ``rel_att = 0`` (a
    Python int), then a padding mask by ``masked_fill(~mask, finfo.min)``."""

    def forward(self, q, k, v, mask):
        w = q @ k.transpose(-1, -2) * 0.25
        rel_att: int = 0
        w = w + rel_att
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
        return torch.softmax(w, dim=-1) @ v


class InplaceScale(nn.Module):
    """The scale applied in place on a copy of q: a zero-user node the rewrite must keep."""

    def forward(self, q, k, v):
        q = q.clone()
        q.mul_(0.25)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class MHABlock(nn.Module):
    def __init__(self, need_weights, return_weights):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights, self.return_weights = need_weights, return_weights

    def forward(self, x, key_padding_mask):
        out, w = self.attn(
            x, x, x, need_weights=self.need_weights, key_padding_mask=key_padding_mask
        )
        return (out, w) if self.return_weights else out


class Second(nn.Module):
    """The second output of a module (to compare attention weights)."""

    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, *args):
        return self.mod(*args)[1]


def causal_padding_allowed(b=B, n=N, pad=5):
    """``[B, 1, N, N]``: causal, and the last ``pad`` keys of batch element 1 are padding."""
    key_valid = torch.ones(b, n, dtype=torch.bool)
    key_valid[1, n - pad :] = False
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None] & key_valid[:, None, None, :]


# ---------------------------------------------------------------- rewritten sites


def test_nanogpt_causal_buffer_mask_rewritten(compile_nanite, assert_close_to_fp64):
    mod = CausalSelfAttention().eval()
    x = torch.randn(B, N, 32)
    backend, out = compile_nanite(mod, x)
    assert backend.counters.get("found_eager") == 1 and backend.counters.get("rewritten") == 1
    site = only_site(backend)
    # the tril buffer is proven causal: the op gets is_causal=True and no N x N mask
    assert (site.status, site.pattern, site.mask_kind) == ("rewritten", "eager", "causal")
    assert site.module_path == ""  # the compiled module itself
    assert_close_to_fp64(mod, (x,), None, out)


def test_non_causal_buffer_stays_a_dense_mask(compile_nanite, assert_close_to_fp64):
    mod = CausalSelfAttention().eval()
    t = mod.bias.shape[-1]
    ones = torch.ones(t, t)
    mod.bias.copy_((torch.tril(ones) - torch.tril(ones, -6)).view(1, 1, t, t))  # sliding window
    x = torch.randn(B, N, 32)
    backend, out = compile_nanite(mod, x)
    site = only_site(backend)
    assert (site.status, site.mask_kind) == ("rewritten", "dense-bool")
    assert_close_to_fp64(mod, (x,), None, out)


@pytest.mark.parametrize(
    "eq_scores, eq_out, scale",
    [
        ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", None),  # no scale: the op must get 1.0
        ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", 0.25),  # [B, N, H, D] layout in and out
        ("...id,...jd->...ij", "...ij,...jd->...id", 0.25),
    ],
)
def test_einsum_forms_rewritten(eq_scores, eq_out, scale, compile_nanite, assert_close_to_fp64):
    mod = EinsumAttention(eq_scores, eq_out, scale)
    q, k, v = qkv()
    if eq_scores.startswith("bqhd"):
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    backend, out = compile_nanite(mod, q, k, v)
    site = only_site(backend)
    assert (site.status, site.pattern) == ("rewritten", "einsum")
    assert_close_to_fp64(mod, (q, k, v), None, out)


@pytest.mark.parametrize("how", ["repeat_kv", "repeat_interleave"])
def test_gqa_repeat_matched_through(how, compile_nanite, assert_close_to_fp64):
    mod = GQAAttention(how).eval()
    q, k, v = qkv(hkv=HKV)
    with recording() as store:
        backend, out = compile_nanite(mod, q, k, v)
    site = only_site(backend)
    assert site.status == "rewritten"
    (records,) = store.values()
    assert records[0]["k_shape"] == [B, HKV, N, D]  # the op got the un-repeated k/v
    assert_close_to_fp64(mod, (q, k, v), None, out)


@pytest.mark.parametrize(
    "mod", [ScaleBefore(both=False), ScaleBefore(both=True), DivAfter()], ids=["q", "qk", "div"]
)
def test_scale_placements(mod, compile_nanite, assert_close_to_fp64):
    q, k, v = qkv(scale=2.0)  # logits large enough that a wrong scale shows
    backend, out = compile_nanite(mod, q, k, v)
    assert only_site(backend).status == "rewritten"
    assert_close_to_fp64(mod, (q, k, v), None, out)


def test_where_bool_mask(compile_nanite, assert_close_to_fp64):
    mod = WhereMask()
    q, k, v = qkv()
    allowed = causal_padding_allowed()
    backend, out = compile_nanite(mod, q, k, v, allowed)
    site = only_site(backend)
    assert (site.status, site.mask_kind) == ("rewritten", "dense-bool")
    assert_close_to_fp64(mod, (q, k, v, allowed), None, out)


def test_additive_mask_input(compile_nanite, assert_close_to_fp64):
    mod = AdditiveMask()
    q, k, v = qkv()
    mask = torch.zeros(B, 1, N, N).masked_fill(
        ~causal_padding_allowed(), torch.finfo(torch.float32).min
    )
    backend, out = compile_nanite(mod, q, k, v, mask)
    site = only_site(backend)
    assert (site.status, site.mask_kind) == ("rewritten", "dense-additive")
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)


def test_masked_fill_finfo_min_padding(compile_nanite, assert_close_to_fp64):
    mod = BlockedFill()
    q, k, v = qkv()
    lengths = torch.tensor([N, N - 7])
    backend, out = compile_nanite(mod, q, k, v, lengths)
    site = only_site(backend)
    assert (site.status, site.mask_kind) == ("rewritten", "dense-bool")
    assert_close_to_fp64(mod, (q, k, v, lengths), None, out)


@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_finite_masked_fill_is_left_exact(compile_nanite, assert_close_to_fp64, budget):
    """``masked_fill(m, -1e4)`` overwrites the scores: next to logits of order 1e4 the
    "blocked" keys take weight in the original, and nothing at run time can tell, so the
    site stays exact with its reason (it used to be rewritten as a hard block: budget 1.0
    then gave plain causal attention, error 2.6)."""
    mod = FiniteBlockFill()
    q, k, v = qkv(b=1, n=96)
    q = q * 1e4  # logits of order 1e4: future keys are not negligible
    ref = mod(q, k, v)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(ref, causal, atol=1e-2)  # the finite mask does leak
    backend, out = compile_nanite(mod, q, k, v, budget=budget, tile=16)
    site = only_site(backend)
    assert site.status == "skipped" and "-10000.0" in site.reason, site
    assert_close_to_fp64(mod, (q, k, v), None, out)


class FarBlockFill(nn.Module):
    """The Annotated Transformer's ``masked_fill(mask == 0, -1e9)``."""

    def forward(self, q, k, v):
        n = q.shape[2]
        s = q @ k.transpose(-2, -1) * 0.25
        return s.masked_fill(torch.ones(n, n).tril() == 0, -1e9).softmax(-1) @ v


class HalfMinFill(nn.Module):
    """fp16's ``finfo.min`` written as a literal (-65504), as half models mask."""

    def forward(self, q, k, v):
        n = q.shape[2]
        s = q @ k.transpose(-2, -1) * 0.25
        return s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -65504.0).softmax(-1) @ v


@pytest.mark.parametrize("cls", [FarBlockFill, HalfMinFill])
def test_far_masked_fill_is_a_block(compile_nanite, assert_close_to_fp64, cls):
    """Values no logit reaches still block: the site is rewritten."""
    mod = cls()
    q, k, v = qkv(b=1, n=96)
    backend, out = compile_nanite(mod, q, k, v, budget=1.0, tile=16)
    site = only_site(backend)
    assert site.status == "rewritten", site
    assert_close_to_fp64(mod, (q, k, v), None, out)


def test_extended_padding_mask_is_a_mask(compile_nanite, assert_close_to_fp64):
    mod = ExtendedMask()
    q, k, v = qkv()
    am = torch.ones(B, N, dtype=torch.long)
    am[1, -5:] = 0
    backend, out = compile_nanite(mod, q, k, v, am)
    site = only_site(backend)
    assert (site.status, site.mask_kind) == ("rewritten", "dense-additive")
    assert_close_to_fp64(mod, (q, k, v, am), None, out)


def test_bmm_slow_path_with_baddbmm_mask(compile_nanite, assert_close_to_fp64):
    mod = BmmSlowPath()
    q, k, v = (t.reshape(B * H, N, D) for t in qkv())
    mask = torch.zeros(B * H, 1, N)
    mask[H:, :, N - 4 :] = float("-inf")  # key padding of the second batch element
    backend, out = compile_nanite(mod, q, k, v, mask)
    site = only_site(backend)
    assert (site.status, site.pattern, site.mask_kind) == ("rewritten", "bmm", "dense-additive")
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)


def test_inplace_scale_is_kept(compile_nanite, assert_close_to_fp64):
    mod = InplaceScale()
    q, k, v = qkv(scale=2.0)
    backend, out = compile_nanite(mod, q, k, v)
    assert only_site(backend).status == "rewritten"
    assert_close_to_fp64(mod, (q, k, v), None, out)


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights_discarded"])
def test_multihead_attention_rewritten(need_weights, compile_nanite, assert_close_to_fp64):
    mod = MHABlock(need_weights, return_weights=False).eval()
    x = torch.randn(B, N, 32)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -6:] = True
    backend, out = compile_nanite(mod, x, kpm)
    site = only_site(backend)
    assert (site.status, site.pattern) == ("rewritten", "mha")
    assert site.module_path == "attn"
    assert_close_to_fp64(mod, (x, kpm), None, out)


class Encoder(nn.Module):
    """``nn.TransformerEncoder``: in eval under no_grad each layer is one fused call."""

    def __init__(self, norm_first=False, activation="relu"):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first, activation=activation
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, mask, key_padding_mask):
        return self.enc(x, mask=mask, src_key_padding_mask=key_padding_mask)


@pytest.mark.parametrize(
    "norm_first, activation, causal",
    [(False, "relu", False), (True, "gelu", True)],
    ids=["post_norm_padding", "pre_norm_gelu_causal_padding"],
)
def test_transformer_encoder_fused_layers_rewritten(
    norm_first, activation, causal, compile_nanite, assert_close_to_fp64
):
    mod = Encoder(norm_first, activation).eval()
    x = torch.randn(B, N, 32)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -6:] = True
    mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None  # True = masked
    backend, out = compile_nanite(mod, x, mask, kpm)
    assert [(s.status, s.pattern, s.module_path) for s in backend.sites] == [
        ("rewritten", "mha", f"enc.layers.{i}") for i in range(2)
    ]
    assert_close_to_fp64(mod, (x, mask, kpm), None, out)


def test_dynamic_length_compiles_once(assert_close_to_fp64):
    mod = CausalSelfAttention().eval()
    backend = NaniteBackend(NaniteConfig(budget=1.0), inner="eager")
    compiled = torch.compile(mod, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for n in (17, 40, 63):
            x = torch.randn(B, n, 32)
            assert_close_to_fp64(mod, (x,), None, compiled(x))
    assert backend.graphs == 1
    assert backend.counters == {"found_eager": 1, "rewritten": 1}


def test_inductor_inner_compiler(assert_close_to_fp64):
    """With inductor behind the rewrite: the scale attribute (a SymFloat under dynamic=True)
    reaching the op's float argument restarts Dynamo's analysis once; the site counts once."""
    mod = EinsumAttention("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", 0.25)
    q, k, v = (t.transpose(1, 2).contiguous() for t in qkv())
    backend = NaniteBackend(NaniteConfig(budget=1.0), inner="inductor")
    compiled = torch.compile(mod, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        out = compiled(q, k, v)
    assert backend.graphs == 1
    assert backend.counters == {"found_einsum": 1, "rewritten": 1}
    assert_close_to_fp64(mod, (q, k, v), None, out)


def test_budget_quarter_runs_tiled(compile_nanite):
    mod = CausalSelfAttention(block_size=256).eval()
    x = torch.randn(1, 256, 32)
    with recording() as store:
        backend, out = compile_nanite(mod, x, budget=0.25, tile=16)
    assert only_site(backend).status == "rewritten"
    assert torch.isfinite(out).all()
    records = [r for recs in store.values() for r in recs]
    assert records and all(r["path"] == "tiled" for r in records), records
    assert records[0]["reads_per_query"] < records[0]["exact_reads_per_query"]


# ---------------------------------------------------------------- skipped sites and non-matches


@pytest.mark.parametrize(
    "mod, reason",
    [
        (SoftCap(), "soft-capping (tanh)"),
        (ALiBi(), "derived from parameters"),
        (RelativeBias(), "derived from parameters"),
        (ComputedBias(), "computed in the graph"),
        (ReturnsWeights(), "used elsewhere"),
        (GQAAttention("repeat_kv").train(), "dropout on the attention weights in training mode"),
        # steps the finder does not read: still attention, reported with the step named
        # (before, such a site was missing from the report)
        (ClampedScores(), "torch.max between the scores and the softmax"),
        (EinsumClamped(), "torch.clamp_min between the scores and the softmax"),
        (ReshapedWeights(), "Tensor.view to another shape between the scores and the softmax"),
        (SinkLogits(), "torch.cat between the scores and the softmax"),
        (ProbsReshaped(), "between the softmax and the product with v"),
    ],
    ids=["softcap", "alibi", "t5_relative", "computed_bias", "weights_returned", "train_dropout",
         "clamped_scores", "einsum_clamped", "reshaped_weights", "sink_logits",
         "probs_reshaped"],  # fmt: skip
)
def test_unprovable_sites_stay_exact(mod, reason, compile_nanite, assert_close_to_fp64):
    q, k, v = qkv()
    backend, out = compile_nanite(mod, q, k, v)
    site = only_site(backend)
    assert site.status == "skipped"
    assert reason in site.reason, site.reason
    assert backend.counters.get("rewritten", 0) == 0
    if not mod.training:  # (training-mode dropout is random)
        assert_close_to_fp64(mod, (q, k, v), None, out, factor=1.0)


def test_a_number_added_to_the_scores_is_no_mask(compile_nanite, assert_close_to_fp64):
    """The softmax does not see a constant added to every score: the site is rewritten with
    the padding mask alone (it crashed at run time when the 0 was taken for a mask)."""
    mod = ScoresPlusZero()
    q, k, v = qkv()
    mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
    mask[1, ..., N - 5 :] = False
    backend, out = compile_nanite(mod, q, k, v, mask)
    site = only_site(backend)
    assert site.status == "rewritten", site.reason
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)


def test_baddbmm_keyword_spelling_rewritten(compile_nanite, assert_close_to_fp64):
    mod = BaddbmmKeywords()
    q, k, v = (t.reshape(B * H, N, D) for t in qkv())
    mask = torch.zeros(B * H, 1, N)
    mask[H:, :, N - 4 :] = float("-inf")
    backend, out = compile_nanite(mod, q, k, v, mask)
    site = only_site(backend)
    assert (site.status, site.pattern, site.mask_kind) == ("rewritten", "bmm", "dense-additive")
    assert_close_to_fp64(mod, (q, k, v, mask), None, out)


def test_multihead_attention_weights_used_is_skipped(compile_nanite, assert_close_to_fp64):
    mod = MHABlock(need_weights=True, return_weights=True).eval()
    x = torch.randn(B, N, 32)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    backend, (out, w) = compile_nanite(mod, x, kpm)
    site = only_site(backend)
    assert (site.status, site.pattern) == ("skipped", "mha")
    assert "need_weights=True" in site.reason
    assert_close_to_fp64(mod, (x, kpm), None, (out,))
    assert_close_to_fp64(Second(mod), (x, kpm), None, w)


def test_classifier_softmax_is_not_attention(compile_nanite):
    mod = Classifier()
    x = torch.randn(B, 5, D)
    backend, out = compile_nanite(mod, x)
    assert backend.sites == []
    assert not any(k.startswith("found") for k in backend.counters)


# ---------------------------------------------------------------- ATen level (torch.export)


@pytest.mark.parametrize(
    "mod, make_args, pattern",
    [
        (CausalSelfAttention().eval(), lambda: (torch.randn(B, N, 32),), "eager"),
        (GQAAttention("repeat_kv").eval(), lambda: qkv(hkv=HKV), "eager"),
        (EinsumAttention("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", 0.25), qkv, "einsum"),
        # nn.MultiheadAttention exported: its bmm slow path; the unused average of the
        # weights stays in the exported graph as dead code
        (MHABlock(need_weights=True, return_weights=False).eval(), lambda: _mha_args(), "bmm"),
    ],
    ids=["nanogpt", "gqa", "einsum", "mha_bmm"],
)
def test_aten_level_after_export(mod, make_args, pattern, assert_close_to_fp64):
    args = make_args()
    ep = torch.export.export(mod, args)
    gm = ep.module()
    assert all(
        "val" in n.meta
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is not torch.ops.aten.sym_size.int
    )
    ctx = PassContext(NaniteConfig(budget=1.0))
    matches = run_passes(gm, ctx)
    assert [(m.pattern, m.skip_reason) for m in matches] == [(pattern, None)]
    assert ctx.counters.get("rewritten") == 1
    assert any(n.target is torch.ops.nanite.tiled_attention.default for n in gm.graph.nodes)
    with torch.no_grad():
        out = gm(*args)
    assert_close_to_fp64(mod, args, None, out)


# ---------------------------------------------------------------- Hugging Face eager attention


def _mha_args():
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -6:] = True
    return torch.randn(B, N, 32), kpm


def test_aten_level_weights_returned_is_skipped():
    mod = MHABlock(need_weights=True, return_weights=True).eval()
    gm = torch.export.export(mod, _mha_args()).module()
    ctx = PassContext(NaniteConfig(budget=1.0))
    (m,) = run_passes(gm, ctx)
    assert m.pattern == "bmm" and "used elsewhere" in m.skip_reason
    assert ctx.counters == {"found_bmm": 1, "skipped": 1}


def _hf(name):
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (2, 12))
    if name == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="eager",
        )
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0  # right padding (left padding leaves rows that are all padding)
        return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": ids, "attention_mask": mask}
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids}
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation="eager",
    )
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_hf_eager_attention_every_layer_rewritten(name, compile_nanite, assert_close_to_fp64):
    model, kwargs = _hf(name)
    backend, out = compile_nanite(model, dynamic=None, fullgraph=False, **kwargs)
    assert len(backend.sites) == 2
    assert all(s.status == "rewritten" and s.pattern == "eager" for s in backend.sites), [
        (s.status, s.reason) for s in backend.sites
    ]
    assert all(s.mask_kind == "dense-additive" for s in backend.sites)
    if name == "llama":
        assert all(s.k_shape[1] == 2 for s in backend.sites)  # GQA: un-repeated k
    assert_close_to_fp64(model, (), kwargs, out)


def test_hf_output_attentions_leaves_sites_exact(compile_nanite):
    model, kwargs = _hf("llama")
    backend, out = compile_nanite(
        model, dynamic=None, fullgraph=False, output_attentions=True, **kwargs
    )
    assert len(backend.sites) == 2
    assert all(s.status == "skipped" and "used elsewhere" in s.reason for s in backend.sites)
