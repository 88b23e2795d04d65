"""Models converted with no hand edits (issue 2).

Each case is a tiny randomly initialised model built from a config (hidden 32,
2 layers, 200 tokens, so ``NaniteConfig(tile=16)`` gives 13 tiles; near field 2
tiles and 1 anchor, so that budget 0.25 coarsens most of them). For every
case: at budget 1.0 the converted output equals the original's within fp32
rounding (measured against an fp64 copy of the original), the report counts
every attention site, at budget 0.25 the output is finite, ``state_dict`` keys
and parameter storage are shared, the original is left untouched, and two
conversions with different budgets are independent. Causal LMs are also run
with and without ``use_cache``, decoded incrementally and through
``generate()``; masks (causal, sliding window, padding) are checked to hold
on the converted model at budget 0.25 by perturbing the tokens they hide.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanite_compile
from nanite_compile import NaniteConfig

transformers = pytest.importorskip("transformers")
from tiny_models import shape_kwargs  # noqa: E402  (after the importorskip)

VOCAB = 128
HIDDEN = 32
HEADS = 4
LAYERS = 2
SEQ = 200  # 12.5 tiles of 16: several tiles and a partial last one
MAX_POS = 256
WINDOW = 64  # Mistral sliding window, well below SEQ
TILE = 16
F32_EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------- models


def _sized(impl, **extra):
    """The shape every family shares: VOCAB tokens, LAYERS layers of HEADS heads, HIDDEN wide."""
    return shape_kwargs(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=HEADS,
                        max_pos=MAX_POS, attn_implementation=impl, **extra)  # fmt: skip


def _llama(impl):
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**_sized(impl, num_key_value_heads=2))
    )


def _mistral(impl):
    cfg = transformers.MistralConfig(**_sized(impl, num_key_value_heads=2, sliding_window=WINDOW))
    return transformers.MistralForCausalLM(cfg)


def _qwen2(impl):
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**_sized(impl, num_key_value_heads=2))
    )


def _gpt2(impl):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=MAX_POS,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation=impl,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _neox(impl):
    cfg = transformers.GPTNeoXConfig(**_sized(impl, bos_token_id=0, eos_token_id=1))
    return transformers.GPTNeoXForCausalLM(cfg)


def _bert(impl):
    return transformers.BertModel(transformers.BertConfig(**_sized(impl)))


def _vit(impl):
    cfg = transformers.ViTConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=64,
        patch_size=8,
        attn_implementation=impl,
    )
    return transformers.ViTModel(cfg)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, written out by hand: causal mask buffer, masked_fill, softmax."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        mask = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer("bias", mask.view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(
        self, vocab=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, block_size=MAX_POS
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _nanogpt(impl):
    return NanoGPT()


def _encoder(impl):
    layer = nn.TransformerEncoderLayer(
        d_model=HIDDEN, nhead=HEADS, dim_feedforward=2 * HIDDEN, dropout=0.0, batch_first=True
    )
    return nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False)


# --------------------------------------------------------------------- cases


def _ids(batch=1, n=SEQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, n), generator=g)


def _lm_inputs():
    return {"input_ids": _ids()}


def _bert_inputs():
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, 150:] = 0  # second row: last 50 positions are padding
    return {"input_ids": ids, "attention_mask": mask}


def _vit_inputs():
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(1, 3, 64, 64, generator=g)}


def _nanogpt_inputs():
    return {"idx": _ids()}


def _encoder_inputs():
    g = torch.Generator().manual_seed(1)
    return {"src": torch.randn(1, SEQ, HIDDEN, generator=g)}


@dataclass
class Case:
    name: str
    impl: str
    build: Callable[[str], nn.Module]
    inputs: Callable[[], dict]
    kind: str  # "causal_lm" (HF), "encoder", "plain_causal", "plain"
    calibration: Callable[[], torch.Tensor] | None = None
    n_sites: int = LAYERS
    hf: bool = True

    @property
    def id(self):
        return f"{self.name}-{self.impl}" if self.hf else self.name


HF_CAUSAL = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2, "neox": _neox}

CASES = [
    *[
        Case(name, impl, build, _lm_inputs, "causal_lm")
        for name, build in HF_CAUSAL.items()
        for impl in ("sdpa", "eager")
    ],
    *[Case("bert", impl, _bert, _bert_inputs, "encoder") for impl in ("sdpa", "eager")],
    *[Case("vit", impl, _vit, _vit_inputs, "encoder") for impl in ("sdpa", "eager")],
    # a plain module with hand-written attention, probed through calibration tokens
    Case(
        "nanogpt",
        "eager",
        _nanogpt,
        _nanogpt_inputs,
        "plain_causal",
        calibration=lambda: _ids(n=MAX_POS, seed=2),
        hf=False,
    ),
    # a plain module without calibration: captured on its first forward
    Case("transformer_encoder", "mha", _encoder, _encoder_inputs, "plain", hf=False),
]
BY_ID = {c.id: c for c in CASES}
CAUSAL_LM_IDS = [c.id for c in CASES if c.kind == "causal_lm"]
CAUSAL_IDS = [c.id for c in CASES if c.kind in ("causal_lm", "plain_causal")]
MISTRAL_IDS = [c.id for c in CASES if c.name == "mistral"]
BERT_IDS = [c.id for c in CASES if c.name == "bert"]


# --------------------------------------------------------------------- helpers


def output_of(out):
    """The main output tensor of a forward (logits, last hidden state, or the tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no main output in {type(out).__name__}")


def run(model, inputs, **extra):
    with torch.no_grad():
        return output_of(model(**inputs, **extra))


def to_fp64(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def rounding_error(out, ref32, ref64, where=None):
    """(error of ``out`` vs fp64, error the original fp32 model itself makes, allowed)."""
    if where is not None:
        out, ref32, ref64 = out[where], ref32[where], ref64[where]
    e_conv = (out.double() - ref64).abs().max().item()
    e_orig = (ref32.double() - ref64).abs().max().item()
    allowed = 4.0 * e_orig + 8 * F32_EPS * ref64.abs().max().item()
    return e_conv, e_orig, allowed


def assert_like_original(out, ref32, ref64, where=None, what="output"):
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    e_conv, e_orig, allowed = rounding_error(out, ref32, ref64, where)
    assert e_conv <= allowed, (
        f"{what}: max |converted - fp64| = {e_conv:.3e} > {allowed:.3e} "
        f"(the original fp32 model's own error is {e_orig:.3e})"
    )


def max_rel_change(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class Bundle:
    """One case: the original, its fp64 twin, reference outputs, and two conversions."""

    def __init__(self, case: Case):
        self.case = case
        torch.manual_seed(0)
        self.model = case.build(case.impl).eval()
        if case.hf:
            assert self.model.config._attn_implementation == case.impl
        self.inputs = case.inputs()
        self.ref32 = run(self.model, self.inputs)
        self.model64 = copy.deepcopy(self.model).double()
        self.ref64 = run(self.model64, to_fp64(self.inputs))
        self.snapshot = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.where = None
        if "attention_mask" in self.inputs:  # compare non-padded positions only
            self.where = self.inputs["attention_mask"].bool()

    def _convert(self, budget):
        cal = self.case.calibration() if self.case.calibration else None
        conv = nanite_compile.convert(
            self.model, budget=budget, calibration=cal,
            config=NaniteConfig(tile=TILE, window=2, anchors=1),
        )
        return conv, run(conv, self.inputs)  # the first forward also captures a plain module

    @cached_property
    def _c1(self):
        return self._convert(1.0)

    @cached_property
    def _c025(self):
        return self._convert(0.25)

    @property
    def conv1(self):
        return self._c1[0]

    @property
    def out1(self):
        return self._c1[1]

    @property
    def conv025(self):
        return self._c025[0]

    @property
    def out025(self):
        return self._c025[1]


_BUNDLES: dict[str, Bundle] = {}


def bundle_for(case_id: str) -> Bundle:
    if case_id not in _BUNDLES:
        _BUNDLES[case_id] = Bundle(BY_ID[case_id])
    return _BUNDLES[case_id]


@pytest.fixture(scope="module", autouse=True)
def _free_bundles():
    yield
    _BUNDLES.clear()


@pytest.fixture(scope="module", params=[c.id for c in CASES])
def bundle(request):
    return bundle_for(request.param)


@pytest.fixture(scope="module", params=CAUSAL_LM_IDS)
def lm(request):
    return bundle_for(request.param)


@pytest.fixture(scope="module", params=CAUSAL_IDS)
def causal(request):
    return bundle_for(request.param)


def _sites_text(rep):
    return "; ".join(f"{s.module_path}: {s.status} {s.reason}".strip() for s in rep.sites)


# --------------------------------------------------------------------- every model


def test_budget_1_matches_original(bundle):
    assert type(bundle.conv1) is type(bundle.model)
    assert_like_original(bundle.out1, bundle.ref32, bundle.ref64, bundle.where, bundle.case.id)


@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_report_counts_every_site(bundle, budget):
    conv = bundle.conv1 if budget == 1.0 else bundle.conv025
    rep = nanite_compile.report(conv)
    n = bundle.case.n_sites
    assert len(rep.sites) == n, (
        f"{bundle.case.id}: report has {len(rep.sites)} sites, the model has {n} attentions "
        f"({_sites_text(rep) or 'no sites'}; notes: {rep.notes})"
    )
    assert len({s.module_path for s in rep.sites}) == n, _sites_text(rep)
    for s in rep.sites:
        assert s.status in ("rewritten", "skipped"), s
        if s.status == "skipped":
            assert s.reason.strip(), f"{s.site} skipped without a reason"
        assert s.pattern
    assert rep.config["budget"] == budget
    assert str(rep)  # the table renders


def test_every_site_rewritten(bundle):
    """Plain attention is never left behind (issue 2, 'What I will check')."""
    rep = nanite_compile.report(bundle.conv1)
    assert rep.sites, f"{bundle.case.id}: no attention site found"
    assert all(s.status == "rewritten" for s in rep.sites), _sites_text(rep)


def test_budget_quarter_finite(bundle):
    out = bundle.out025
    assert out.shape == bundle.ref32.shape
    assert torch.isfinite(out).all()
    for s in nanite_compile.report(bundle.conv025).sites:
        if s.rel_error is not None:
            assert math.isfinite(s.rel_error), s


def test_state_dict_and_shared_parameters(bundle):
    orig = bundle.model
    for conv in (bundle.conv1, bundle.conv025):
        assert list(conv.state_dict().keys()) == list(orig.state_dict().keys())
        params = dict(conv.named_parameters())
        assert params.keys() == dict(orig.named_parameters()).keys()
        for name, p in orig.named_parameters():
            assert params[name].data_ptr() == p.data_ptr(), f"{name} is not shared"


def test_original_unchanged(bundle):
    assert bundle.conv1 is not None and bundle.conv025 is not None  # both converted and ran
    orig = bundle.model
    assert "_nanite_state" not in orig.__dict__ and not hasattr(orig, "_nanite_state")
    assert not [n for n, m in orig.named_modules() if "forward" in m.__dict__], (
        "convert() patched a forward of the original model"
    )
    assert not orig._forward_pre_hooks and not orig._forward_hooks
    for k, v in orig.state_dict().items():
        assert torch.equal(v, bundle.snapshot[k]), k
    assert torch.equal(run(orig, bundle.inputs), bundle.ref32)


def test_two_conversions_are_independent(bundle):
    c1, c025 = bundle.conv1, bundle.conv025
    assert c1 is not c025
    assert nanite_compile.report(c1).config["budget"] == 1.0
    assert nanite_compile.report(c025).config["budget"] == 0.25
    # the later conversion did not change the earlier one
    assert torch.equal(run(c1, bundle.inputs), bundle.out1)
    assert_like_original(run(c1, bundle.inputs), bundle.ref32, bundle.ref64, bundle.where)
    mods1, mods025 = dict(c1.named_modules()), dict(c025.named_modules())
    for name, m in mods1.items():
        assert m is not mods025[name], f"module {name!r} is shared between conversions"


# --------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("use_cache", [False, True])
def test_use_cache_forward(lm, use_cache):
    out = run(lm.conv1, lm.inputs, use_cache=use_cache)
    assert_like_original(out, lm.ref32, lm.ref64, what=f"use_cache={use_cache}")
    out = run(lm.conv025, lm.inputs, use_cache=use_cache)
    assert out.shape == lm.ref32.shape and torch.isfinite(out).all()


def _incremental(model, ids, split):
    """Prefill ``ids[:, :split]`` with a cache, then decode the rest as one chunk."""
    with torch.no_grad():
        first = model(input_ids=ids[:, :split], use_cache=True)
        second = model(input_ids=ids[:, split:], cache=first.cache, use_cache=True)
    return torch.cat([first.logits, second.logits], dim=1)


def test_cached_decoding(lm):
    """Prefill then decode 8 tokens against the cache (queries fewer than keys)."""
    ids, split = lm.inputs["input_ids"], SEQ - 8
    ref32 = _incremental(lm.model, ids, split)
    out1 = _incremental(lm.conv1, ids, split)
    assert_like_original(out1, ref32, lm.ref64, what="prefill + cached decode, budget 1.0")
    out025 = _incremental(lm.conv025, ids, split)
    assert out025.shape == ref32.shape and torch.isfinite(out025).all()


def test_cached_chunk_runs_tiled(lm):
    """A chunk of 80 tokens after a cache of 120 (a second turn, chunked prefill; it starts
    inside a tile) runs the tiled op at every site, under the decoder's own mask, and its
    outputs depend on no later token of the chunk."""
    from nanite_compile.kernels.ops import recording

    ids, split = lm.inputs["input_ids"], SEQ - 80
    with recording() as rec:
        out = _incremental(lm.conv025, ids, split)
    chunk = [r for recs in rec.values() for r in recs if r["q_shape"][2] == SEQ - split]
    assert len(chunk) == lm.case.n_sites, rec.keys()
    for r in chunk:
        assert r["path"] == "tiled" and r["mask"].startswith(("causal", "sliding")), r
        assert r["reads_per_query"] < r["exact_reads_per_query"], r
    changed = ids.clone()
    changed[:, -20:] = (changed[:, -20:] + 7) % VOCAB
    out2 = _incremental(lm.conv025, changed, split)
    torch.testing.assert_close(out2[:, split:-20], out[:, split:-20], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out2[:, -20:], out[:, -20:])


def test_batch_row_does_not_depend_on_another_rows_padding(lm):
    """Row 0 of a batch whose row 1 is left-padded gives what row 0 gives alone, at budget
    0.25: Hugging Face's SDPA path repeats the KV heads when it has a mask, and the
    finder hands the op the heads before the repeat (one level table per KV head)
    either way."""
    from nanite_compile.kernels.ops import recording

    ids = lm.inputs["input_ids"]
    batch = torch.cat([ids, ids.flip(1)])
    mask = torch.ones_like(batch)
    mask[1, :37] = 0
    with torch.no_grad(), recording() as rec:
        both = output_of(lm.conv025(input_ids=batch, attention_mask=mask))
        alone = output_of(lm.conv025(input_ids=ids))
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)
    for recs in rec.values():  # the padded call's K/V heads are the unpadded call's
        assert recs[0]["k_shape"][1] == recs[1]["k_shape"][1], recs


def test_generate(lm):
    prompt = lm.inputs["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = lm.model.generate(prompt, **kw)
        got = lm.conv1.generate(prompt, **kw)
    assert torch.equal(got, want), f"greedy tokens {got[0, SEQ:]} != {want[0, SEQ:]}"


def test_generate_budget_quarter(lm):
    prompt = lm.inputs["input_ids"]
    with torch.no_grad():
        got = lm.conv025.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert got.shape[0] == 1 and SEQ < got.shape[1] <= SEQ + 2
    assert torch.equal(got[:, :SEQ], prompt)


def test_no_future_leak_at_budget_quarter(causal):
    """Changing the last 20 tokens leaves every earlier position's output as it was."""
    key = next(iter(causal.inputs))
    ids = causal.inputs[key]
    changed = ids.clone()
    changed[:, -20:] = (changed[:, -20:] + 7) % VOCAB
    a = run(causal.conv025, {key: ids})[:, :-20]
    b = run(causal.conv025, {key: changed})[:, :-20]
    change = max_rel_change(a, b)
    assert change <= 1e-5, (
        f"earlier outputs moved by {change:.3e} (relative) when later tokens changed"
    )


# --------------------------------------------------------------------- masks


@pytest.fixture(scope="module", params=MISTRAL_IDS)
def mistral(request):
    return bundle_for(request.param)


def test_mistral_sliding_window(mistral):
    """Keys beyond the window are invisible: with 2 layers of window 64, token 0 cannot
    reach positions >= 127. True of the original (so the window is live), of the
    converted model at budget 1.0 (equal to the original) and at budget 0.25."""
    ids = mistral.inputs["input_ids"]
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 7) % VOCAB
    reach = LAYERS * (WINDOW - 1) + 1
    orig_a, orig_b = mistral.ref32, run(mistral.model, {"input_ids": changed})
    assert max_rel_change(orig_a[:, :WINDOW], orig_b[:, :WINDOW]) > 1e-3  # token 0 matters
    assert max_rel_change(orig_a[:, reach:], orig_b[:, reach:]) <= 1e-6  # ... within reach only
    # positions past the window, at budget 1.0: equal to the original
    assert_like_original(
        mistral.out1[:, WINDOW:],
        orig_a[:, WINDOW:],
        mistral.ref64[:, WINDOW:],
        what="positions beyond the window",
    )
    for conv, out, budget in (
        (mistral.conv1, mistral.out1, 1.0),
        (mistral.conv025, mistral.out025, 0.25),
    ):
        moved = run(conv, {"input_ids": changed})
        change = max_rel_change(out[:, reach:], moved[:, reach:])
        assert change <= 1e-5, (
            f"budget {budget}: token 0 changed positions >= {reach} by {change:.3e} (relative); "
            "the sliding window leaks"
        )


@pytest.fixture(scope="module", params=BERT_IDS)
def bert(request):
    return bundle_for(request.param)


def test_bert_padding(bert):
    """Padded keys are invisible: changing the padded tokens leaves the real positions as
    they were, at budget 1.0 (where they equal the original) and 0.25."""
    mask = bert.inputs["attention_mask"]
    valid = mask.bool()
    assert not valid.all()
    assert_like_original(bert.out1, bert.ref32, bert.ref64, valid, "non-padded positions")
    changed = dict(bert.inputs)
    changed["input_ids"] = torch.where(
        valid, bert.inputs["input_ids"], (bert.inputs["input_ids"] + 7) % VOCAB
    )
    for conv, out, budget in ((bert.conv1, bert.out1, 1.0), (bert.conv025, bert.out025, 0.25)):
        moved = run(conv, changed)
        change = max_rel_change(out[valid], moved[valid])
        assert change <= 1e-5, (
            f"budget {budget}: padded tokens moved real positions by {change:.3e}"
        )


# --------------------------------------------------------------------- families left exact


def _xglm():
    cfg = transformers.XGLMConfig(
        vocab_size=VOCAB, d_model=HIDDEN, ffn_dim=2 * HIDDEN, num_layers=LAYERS,
        attention_heads=HEADS, max_position_embeddings=MAX_POS,
    )  # fmt: skip
    return transformers.XGLMForCausalLM(cfg)


def _bloom():
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    return transformers.BloomForCausalLM(cfg)


@pytest.mark.parametrize(
    "build, reason",
    [
        (_xglm, "Tensor.view to another shape, torch.max between the scores and the softmax"),
        (_bloom, "Tensor.view to another shape between the scores and the softmax"),
    ],
    ids=["xglm", "bloom"],
)
def test_eager_attention_the_finder_cannot_read_is_reported(build, reason):
    """XGLM clamps its scores with torch.max and both it and Bloom (ALiBi) view the weights
    as [B, H, N, N] and back around the softmax: every layer's attention is in the report,
    skipped with the step named, and the converted model computes what the original does."""
    torch.manual_seed(0)
    model = build().eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=TILE, window=2, anchors=1, budget=0.25))
    with torch.no_grad():
        out = conv(ids).logits
    sites = nanite_compile.report(conv).sites
    assert len(sites) == LAYERS, sites
    assert all(s.status == "skipped" and reason in s.reason for s in sites), [s.reason for s in sites]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
