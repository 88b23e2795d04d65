"""The public API on bad input and its promised behaviour (issue 2, "Bad input").

Budgets outside (0, 1], NaN or not numbers, things that are not modules and
unknown options are clear errors naming the fix; a model without attention
comes back unchanged; a sequence shorter than one tile runs the exact path;
fp16/bf16 models stay finite and as close to fp64 as the original is; configs
and reports round-trip through JSON; the ``nanite`` torch.compile backend and
lazy capture of plain modules work; importing the package does not import
Triton.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanite_compile
from nanite_compile import NaniteConfig, RewriteReport, SiteReport
from nanite_compile.kernels.ops import recording

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402  (after the importorskip)

VOCAB = 128
TILE = 16
LAYER_PATHS = {"model.layers.0.self_attn", "model.layers.1.self_attn"}


def tiny_llama(dtype=torch.float32, impl="sdpa"):
    return _tiny_llama(vocab=VOCAB, impl=impl, dtype=dtype)


def ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def assert_rounding_close(out, ref, ref64, eps, what="output"):
    """``out`` is as close to the fp64 run as the original ``ref`` is (4x, plus a floor)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    e_conv = (out.double() - ref64).abs().max().item()
    e_orig = (ref.double() - ref64).abs().max().item()
    allowed = 4.0 * e_orig + 8 * eps * ref64.abs().max().item()
    assert e_conv <= allowed, (
        f"{what}: max |converted - fp64| = {e_conv:.3e} > {allowed:.3e} "
        f"(the original's own error is {e_orig:.3e})"
    )


def tile_cfg(**kw):
    return NaniteConfig(tile=TILE, **kw)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.net(x).softmax(-1)  # a softmax that is no attention


class SDPAAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class TwoBlocks(nn.Module):
    """A plain module (no config, no main_input_name) with two attentions."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SDPAAttention(), SDPAAttention()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_quarter(llama):
    return nanite_compile.convert(llama, budget=0.25, config=tile_cfg())


# ----------------------------------------------------------------- bad input


BAD_BUDGETS = [
    (0, ValueError, r"budget must be in \(0, 1\].*1\.0 keeps attention exact"),
    (-1, ValueError, r"budget must be in \(0, 1\]"),
    (1.5, ValueError, r"budget must be in \(0, 1\]"),
    (float("nan"), ValueError, r"budget must be in \(0, 1\].*nan"),
    ("0.25", TypeError, r"budget must be a number in \(0, 1\].*e\.g\. 0\.25.*str"),
    (True, TypeError, r"budget must be a number in \(0, 1\].*bool"),
    (None, TypeError, r"budget must be a number"),
]


def test_numpy_and_tensor_budgets_are_numbers():
    """A budget from numpy or a 0-d tensor (a sweep over np.linspace) is a number."""
    import numpy as np

    for b in (np.float32(0.5), np.float64(0.25), torch.tensor(0.1)):
        cfg = NaniteConfig(budget=b)
        assert type(cfg.budget) is float and cfg.budget == pytest.approx(float(b))
        assert json.loads(cfg.to_json())["budget"] == cfg.budget
    with pytest.raises(TypeError, match="budget must be a number"):
        NaniteConfig(budget=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize(
    ("budget", "exc", "match"), BAD_BUDGETS, ids=["0", "-1", "1.5", "nan", "str", "True", "None"]
)
def test_bad_budget_is_a_clear_error(budget, exc, match):
    model = MLP()
    with pytest.raises(exc, match=match):
        nanite_compile.convert(model, budget=budget)
    assert "_nanite_state" not in model.__dict__
    with pytest.raises(exc, match=match):
        NaniteConfig(budget=budget)
    with pytest.raises(exc, match=match):
        nanite_compile.convert(model, config={"budget": budget})


@pytest.mark.parametrize("budget", [1, 1.0, 0.5, 1e-3, torch.tensor(0.5).item()])
def test_good_budgets_are_accepted(budget):
    conv = nanite_compile.convert(MLP(), budget=budget)
    assert nanite_compile.report(conv).config["budget"] == float(budget)


@pytest.mark.parametrize(
    "thing",
    [lambda x: x, "model", None, {"model": 1}, torch.zeros(3)],
    ids=["function", "str", "None", "dict", "tensor"],
)
def test_convert_rejects_what_is_not_a_module(thing):
    with pytest.raises(TypeError, match=r"torch\.nn\.Module.*got"):
        nanite_compile.convert(thing, budget=0.5)


def test_report_of_something_not_converted():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        nanite_compile.report("model")
    with pytest.raises(ValueError, match=r"not converted.*nanite_compile\.convert"):
        nanite_compile.report(MLP())


def test_model_without_attention_is_unchanged():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 7, 16)
    want = model(x)
    conv = nanite_compile.convert(model, budget=0.25)
    assert type(conv) is MLP
    assert torch.equal(conv(x), want)
    assert torch.equal(conv(x[:1]), model(x[:1]))
    rep = nanite_compile.report(conv)
    assert rep.sites == []
    assert rep.summary()["sites"] == 0
    assert "0 attention sites" in str(rep)


def test_model_without_attention_with_calibration():
    """A float calibration tensor for a plain module without attention: nothing to rewrite."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 5, 16)
    conv = nanite_compile.convert(model, budget=0.25, calibration=x)
    assert nanite_compile.report(conv).sites == []
    assert torch.equal(conv(x), model(x))


def test_sequence_shorter_than_one_tile_runs_exact(llama):
    short = ids(TILE - 6)
    want = logits(llama, short)
    want64 = logits(copy.deepcopy(llama).double(), short)
    # measured on the short calibration: the report says exact
    conv = nanite_compile.convert(llama, budget=0.25, calibration=short, config=tile_cfg())
    rep = nanite_compile.report(conv)
    assert {s.site for s in rep.sites} == LAYER_PATHS
    for s in rep.sites:
        assert s.status == "rewritten"
        assert s.runtime_path == "exact", s
        assert s.runtime_reason, "the exact path says why"
    # and the op itself takes the exact path on a fresh call
    with recording() as rec:
        out = logits(conv, short)
    assert set(rec) == LAYER_PATHS
    assert all(r["path"] == "exact" for recs in rec.values() for r in recs), rec
    assert_rounding_close(out, want, want64, torch.finfo(torch.float32).eps)


def test_short_sequence_after_long_probe_runs_exact(llama_quarter, llama):
    """Converted on the synthetic (long) probe, then called with fewer tokens than a tile."""
    probe_paths = {s.runtime_path for s in nanite_compile.report(llama_quarter).sites}
    assert probe_paths == {"tiled"}, "the long probe runs the tiled path"
    short = ids(5, seed=3)
    with recording() as rec:
        out = logits(llama_quarter, short)
    assert set(rec) == LAYER_PATHS
    assert all(r["path"] == "exact" for recs in rec.values() for r in recs), rec
    assert_rounding_close(
        out,
        logits(llama, short),
        logits(copy.deepcopy(llama).double(), short),
        torch.finfo(torch.float32).eps,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_models(dtype):
    model = tiny_llama(dtype)
    x = ids(200)
    want = logits(model, x)
    want64 = logits(copy.deepcopy(model).double(), x)
    eps = torch.finfo(dtype).eps
    conv1 = nanite_compile.convert(model, budget=1.0, config=tile_cfg())
    assert_rounding_close(logits(conv1, x), want, want64, eps, f"{dtype} at budget 1.0")
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    out = logits(conv, x)
    assert out.dtype == dtype and out.shape == want.shape
    assert torch.isfinite(out).all()
    rep = nanite_compile.report(conv)
    assert {s.site for s in rep.sites} == LAYER_PATHS
    assert all(s.status == "rewritten" for s in rep.sites)
    for s in rep.sites:
        assert s.rel_error is not None and math.isfinite(s.rel_error), s
    # the tiled path in low precision is about as far from fp64 as in fp32
    model32 = copy.deepcopy(model).float()
    conv32 = nanite_compile.convert(model32, budget=0.25, config=tile_cfg())
    out32 = logits(conv32, x)
    e_lp = (out.double() - want64).norm() / want64.norm()
    e_32 = (out32.double() - want64).norm() / want64.norm()
    e_orig_lp = (want.double() - want64).norm() / want64.norm()
    assert e_lp <= e_32 + 4 * e_orig_lp + eps, (e_lp, e_32, e_orig_lp)


# ----------------------------------------------------------------- options


def test_unknown_config_options_are_type_errors():
    with pytest.raises(TypeError):
        NaniteConfig(tiles=16)
    with pytest.raises(TypeError, match=r"unknown nanite option.*'tiles'.*known options"):
        NaniteConfig.from_options({"tiles": 16})
    with pytest.raises(TypeError, match=r"tiles"):
        nanite_compile.convert(MLP(), config={"tiles": 16})
    with pytest.raises(TypeError, match=r"NaniteConfig"):
        nanite_compile.convert(MLP(), config="tile=16")


@pytest.mark.parametrize(
    ("options", "exc", "match"),
    [
        ({"tile": 24}, ValueError, "power of two"),
        ({"tile": 16.0}, TypeError, "tile must be an int"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
        ({"inner": "aot"}, ValueError, "inner must be one of"),
        ({"budget_reads": 0}, ValueError, "budget_reads must be >= 1"),
        ({"max_level": -1}, ValueError, "max_level must be >= 0"),
        ({"max_level": 1.5}, TypeError, "max_level must be an int"),
        ({"plan_tokens": 1}, ValueError, "plan_tokens must be >= 2"),
        ({"plan_tokens": 4096.0}, TypeError, "plan_tokens must be an int"),
    ],
)
def test_bad_config_values(options, exc, match):
    with pytest.raises(exc, match=match):
        NaniteConfig(**options)


def test_budget_argument_overrides_config():
    conv = nanite_compile.convert(MLP(), budget=1.0, config=NaniteConfig(budget=0.5, tile=32))
    c = nanite_compile.report(conv).config
    assert c["budget"] == 1.0 and c["tile"] == 32
    conv = nanite_compile.convert(MLP(), config={"budget": 0.5, "tile": 32})
    c = nanite_compile.report(conv).config
    assert c["budget"] == 0.5 and c["tile"] == 32


def test_config_json_round_trip():
    c = NaniteConfig(
        budget=0.5,
        budget_reads=300,
        tile=32,
        window=3,
        anchors=0,
        horizon=8,
        state_features=16,
        seed=3,
        impl="torch",
        inner="eager",
        chunk_bytes=2**20,
    )
    text = c.to_json()
    assert json.loads(text)["tile"] == 32
    back = NaniteConfig.from_json(text)
    assert back == c and back.to_json() == text
    assert NaniteConfig.from_json(NaniteConfig().to_json()) == NaniteConfig()
    with pytest.raises(ValueError, match="object"):
        NaniteConfig.from_json("[1, 2]")
    with pytest.raises(TypeError, match="tiles"):
        NaniteConfig.from_json('{"tiles": 16}')


def test_report_json_round_trip(llama_quarter):
    rep = nanite_compile.report(llama_quarter)
    assert isinstance(rep, RewriteReport)
    assert all(isinstance(s, SiteReport) for s in rep.sites)
    text = rep.to_json()
    back = RewriteReport.from_json(text)
    assert back.to_json() == text
    assert back.sites == rep.sites and back.config == rep.config and back.model == rep.model
    table = str(rep)
    assert "LlamaForCausalLM" in table and "2 attention sites" in table
    for path in LAYER_PATHS:
        assert path in table
    with pytest.raises(ValueError, match="to_json"):
        RewriteReport.from_json('{"model": "x"}')


def test_report_sites_say_what_was_done(llama_quarter):
    rep = nanite_compile.report(llama_quarter)
    assert {s.module_path for s in rep.sites} == LAYER_PATHS
    for s in rep.sites:
        assert s.status == "rewritten" and s.reason == ""
        assert s.pattern == "sdpa"
        assert s.mask_kind == "causal"
        assert s.plan["tile"] == TILE and s.plan["budget"] == 0.25
        assert s.runtime_path == "tiled"
        assert s.reads_per_query < s.exact_reads_per_query
        assert s.flops_after < s.flops_before
        assert 0 < s.rel_error < 1
    sm = rep.summary()
    assert sm["sites"] == 2 and sm["rewritten"] == 2 and sm["skipped"] == 0
    assert 0 < sm["flops_ratio"] < 1


def test_report_notes_a_budget_the_input_is_too_short_for(llama, llama_quarter):
    """On the 256-token probe (the tiny Llama's whole context), near field, anchors and
    one read per older tile alone are about two thirds of the original reads: the report
    says the budget was not met, by how much, and why; a plan that can meet it gets no
    such note."""
    rep = nanite_compile.report(llama_quarter)
    ratios = [s.reads_per_query / s.exact_reads_per_query for s in rep.sites]
    assert min(ratios) > 0.25 * 1.05
    [note] = [n for n in rep.notes if "more than their budget" in n]
    assert f"x{max(ratios):.3f}" in note and "budget 0.25" in note and "256 tokens" in note
    assert "near field (4 tiles of 16)" in note and "2 anchor tile(s)" in note
    lean = nanite_compile.convert(llama, budget=0.5, config=tile_cfg(window=1, anchors=0))
    rep = nanite_compile.report(lean)
    assert all(s.reads_per_query <= 0.5 * 1.05 * s.exact_reads_per_query for s in rep.sites)
    assert not any("more than their budget" in n for n in rep.notes), rep.notes


# ----------------------------------------------------------------- capture paths


def _compiled_llama(reset=True):
    if reset:  # a fresh Dynamo cache: graphs compiled for other instances are not reused
        torch._dynamo.reset()
    model = tiny_llama()
    compiled = torch.compile(model, backend="nanite", options={"budget": 1.0, "inner": "eager"})
    return model, compiled


def test_torch_compile_backend(llama):
    model, compiled = _compiled_llama()
    x = ids(100)
    out = logits(compiled, x)
    assert_rounding_close(
        out,
        logits(model, x),
        logits(copy.deepcopy(model).double(), x),
        torch.finfo(torch.float32).eps,
    )
    rep = nanite_compile.report(compiled)
    assert sorted(s.module_path for s in rep.sites) == sorted(LAYER_PATHS), rep
    assert all(s.status == "rewritten" and s.pattern == "sdpa" for s in rep.sites)


def test_torch_compile_report_has_one_entry_per_site():
    """A second length (Dynamo recompiles once for dynamic shapes) adds no duplicate sites."""
    model, compiled = _compiled_llama()
    logits(compiled, ids(100))
    logits(compiled, ids(120))
    rep = nanite_compile.report(compiled)
    assert sorted(s.module_path for s in rep.sites) == sorted(LAYER_PATHS), (
        f"{len(rep.sites)} entries: {[s.module_path for s in rep.sites]}"
    )


def test_torch_compile_report_of_a_second_instance():
    """Dynamo reuses the graph compiled for the first instance of the class (parameters are
    graph inputs); the report of the second instance still lists its sites."""
    _, first = _compiled_llama()
    logits(first, ids(100))
    _, second = _compiled_llama(reset=False)
    out = logits(second, ids(100))
    assert torch.isfinite(out).all()
    rep = nanite_compile.report(second)
    assert sorted(s.module_path for s in rep.sites) == sorted(LAYER_PATHS), (
        f"{len(rep.sites)} entries: {[s.module_path for s in rep.sites]}"
    )


def test_torch_compile_report_claims_nothing_it_did_not_compile():
    """The shape match for a second instance (above) also answered for models never
    compiled with nanite, or compiled with another backend: "rewritten" for attention
    that ran as it was. A compiled model that has not run yet gave an empty report."""
    _, first = _compiled_llama()
    logits(first, ids(100))
    plain = tiny_llama()
    with pytest.raises(ValueError, match="was not converted"):
        nanite_compile.report(plain)
    other = torch.compile(tiny_llama(), backend="eager")
    logits(other, ids(100))
    with pytest.raises(ValueError, match="another torch.compile backend"):
        nanite_compile.report(other)
    # (one of the first's shapes would count as that model's second instance)
    fresh = torch.compile(_tiny_llama(hidden=48), backend="nanite", options={"inner": "eager"})
    with pytest.raises(ValueError, match="has not run"):
        nanite_compile.report(fresh)
    from nanite_compile.backend import NaniteBackend, compiled_with_nanite

    assert compiled_with_nanite(first) is True and compiled_with_nanite(other) is False
    assert compiled_with_nanite(torch.compile(plain, backend=NaniteBackend())) is True
    assert compiled_with_nanite(plain) is None


def test_report_of_a_compiled_converted_model_is_its_conversion(llama_quarter):
    compiled = torch.compile(llama_quarter, backend="nanite", options={"inner": "eager"})
    logits(compiled, ids(100))
    assert nanite_compile.report(compiled).to_dict() == nanite_compile.report(
        llama_quarter).to_dict()


def test_torch_compile_report_ignores_other_conversions():
    """convert() shares the parameters; its sites are not the compiled model's."""
    torch._dynamo.reset()
    model = tiny_llama()
    nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    compiled = torch.compile(model, backend="nanite", options={"budget": 1.0, "inner": "eager"})
    logits(compiled, ids(100))
    rep = nanite_compile.report(compiled)
    assert sorted(s.module_path for s in rep.sites) == sorted(LAYER_PATHS), (
        f"{len(rep.sites)} entries: {[s.module_path for s in rep.sites]}"
    )
    assert all(s.plan.get("budget") == 1.0 for s in rep.sites), [s.plan for s in rep.sites]


# ------------------------------------------- calls the rewrite does not cover


_EXACT_CALLS = "original attention of a rewritten site"


def test_a_graph_break_inside_the_attention_keeps_the_site_tiled_with_its_plan():
    """``output_attentions=True`` on an SDPA Llama puts a graph break (transformers'
    warning) inside the attention. The graph Dynamo compiles after it took dropout_p as a
    run-time value (the site ran the original attention, silently, while the report said
    "rewritten") and symbolic head counts (a tile for unknown heads: another plan). Now
    it runs the site's one plan: the same output as the call without the flag."""
    model = tiny_llama()
    conv = nanite_compile.convert(model, budget=0.25, config=NaniteConfig())
    x = ids(200)
    tiled = logits(conv, x)
    assert not torch.allclose(tiled, logits(model, x), atol=1e-4)  # budget < 1: tiled
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = conv(input_ids=x, output_attentions=True).logits
    assert not [w for w in caught if "nanite_compile" in str(w.message)]
    torch.testing.assert_close(out, tiled, rtol=0, atol=0)
    rep = nanite_compile.report(conv)
    assert sorted(s.site for s in rep.sites) == sorted(LAYER_PATHS)
    assert all(s.status == "rewritten" and not s.exact_variants for s in rep.sites), rep


def test_attention_dropout_in_training_runs_exact_and_says_so():
    """Training mode with a real attention dropout: those calls run the original attention
    (dropout is not tiled), with a warning when they compile and the reason in the
    report; eval-mode calls stay tiled."""
    model = tiny_llama()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    x = ids(200)
    tiled = logits(conv, x)
    with pytest.warns(UserWarning, match=_EXACT_CALLS), torch.no_grad():
        conv.train()(input_ids=x)
    rep = nanite_compile.report(conv.eval())
    assert sorted(s.site for s in rep.sites) == sorted(LAYER_PATHS)
    for s in rep.sites:
        assert s.status == "rewritten" and s.runtime_path == "tiled", s
        assert s.exact_variants == ["dropout_p is not 0 (training-time dropout inside attention)"]
        assert s.why_exact().startswith("exact on other calls: dropout_p"), s.why_exact()
    assert str(rep).count("exact on other calls") == len(LAYER_PATHS)
    assert RewriteReport.from_json(rep.to_json()) == rep
    torch.testing.assert_close(logits(conv, x), tiled, rtol=0, atol=0)  # still tiled


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_run_time_dropout_is_guarded_not_assumed(impl):
    """Under torch.compile a training-mode dropout_p is a run-time float: the rewrite
    holds while it is 0 (the graph is guarded on it), so a dropout set later recompiles
    to the original attention and back."""
    torch._dynamo.reset()
    model = tiny_llama(impl=impl).train()
    compiled = torch.compile(model, backend="nanite", options={"budget": 0.25, "inner": "eager"})
    x = ids(150)
    paths = []
    for p in (0.0, 0.5, 0.0):
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = p
        with recording() as rec, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(input_ids=x)
        paths.append(sorted({r["path"] for recs in rec.values() for r in recs}))
    assert paths == [["tiled"], [], ["tiled"]], paths


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gradient_checkpointing_keeps_attention_tiled(impl):
    """With activation checkpointing Dynamo traces a decoder layer as a higher-order op
    whose body holds the attention (and, under dynamic floats, takes the softmax scale
    and dropout as tensors): the layer ran the original attention with no word in the
    report. The body is rewritten too: the loss and gradients equal those without
    checkpointing, and the backward recomputes the tiled attention."""
    results = []
    for checkpointing in (False, True):
        model = _tiny_llama(impl=impl, max_pos=512)
        if checkpointing:
            model.activation_checkpointing_enable()
        conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg()).train()
        x = ids(200)
        with recording() as rec, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers: use_cache under checkpointing
            loss = conv(input_ids=x, labels=x).loss
            loss.backward()
        paths = {site: [r["path"] for r in recs] for site, recs in rec.items()}
        calls = 2 if checkpointing else 1  # the forward, and its recompute in the backward
        assert paths == {site: ["tiled"] * calls for site in LAYER_PATHS}, paths
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-9)


def test_returned_attention_weights_are_one_report_entry_per_site():
    """An eager Llama asked for its attention weights runs them exact (they are returned);
    the graph compiled inside the decoder layer after the break names the layer, not the
    attention, and used to add a second, skipped entry per layer."""
    model = tiny_llama(impl="eager")
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    x = ids(200)
    with pytest.warns(UserWarning, match=_EXACT_CALLS), torch.no_grad():
        out = conv(input_ids=x, output_attentions=True)
        ref = model(input_ids=x, output_attentions=True)
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    rep = nanite_compile.report(conv)
    assert sorted(s.site for s in rep.sites) == sorted(LAYER_PATHS), [s.site for s in rep.sites]
    for s in rep.sites:
        assert s.status == "rewritten", s
        assert [v for v in s.exact_variants if "used elsewhere" in v], s.exact_variants


def test_calls_after_returned_attention_weights_stay_tiled():
    """One ``output_attentions=True`` call leaves transformers' output-capturing hooks on
    the attention modules; a captured decoder layer traces them, and their ContextVar
    read broke the graph: every call signature compiled afterwards (here
    ``use_cache=False``) ran the original attention, silently."""
    model = tiny_llama(impl="eager")
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    x = ids(200)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        weights = conv(input_ids=x, output_attentions=True).attentions
    assert len(weights) == 2 and weights[0].shape == (1, 4, 200, 200)
    with recording() as rec, torch.no_grad():
        out = conv(input_ids=x, use_cache=False).logits
    assert {s: [r["path"] for r in recs] for s, recs in rec.items()} == {
        s: ["tiled"] for s in LAYER_PATHS}, rec
    torch.testing.assert_close(out, logits(conv, x), rtol=0, atol=0)


@pytest.mark.parametrize("exact_first", [False, True])
def test_torch_compile_report_merges_call_signatures(exact_first):
    """Under ``torch.compile(backend="nanite")`` each graph has its own backend, and the
    graph of ``output_attentions=True`` names the attention from ``model``'s frame
    (``layers.0.self_attn``): one entry per site, rewritten, with the exact call
    signature noted, in either order. The warning comes with the call that runs exact."""
    torch._dynamo.reset()
    model = tiny_llama(impl="eager")
    compiled = torch.compile(model, backend="nanite", options={"budget": 0.25, "inner": "eager"})
    x = ids(100)
    calls = [True, False] if exact_first else [False, True]
    for oa in calls:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(input_ids=x, output_attentions=oa)
        warned = any(_EXACT_CALLS in str(w.message) for w in caught)
        assert warned == (oa and not exact_first), (oa, [str(w.message) for w in caught])
    rep = nanite_compile.report(compiled)
    assert sorted(s.module_path for s in rep.sites) == sorted(LAYER_PATHS), [
        s.site for s in rep.sites]
    for s in rep.sites:
        assert s.status == "rewritten" and s.exact_variants, s


def _site(site, status="rewritten", reason=""):
    return SiteReport(site=site, module_path=site, pattern="sdpa", mask_kind="causal",
                      q_shape=None, k_shape=None, status=status, reason=reason)


def test_report_flops_ratio_says_which_sites_it_counts():
    """A skipped site (T5's relative-bias self-attention) has no measured FLOPs: the
    ratio over the rewritten cross-attention alone read as the model's saving."""
    tiled = _site("dec.cross")
    tiled.flops_before, tiled.flops_after = 100.0, 25.0
    rep = RewriteReport(model="M", config={}, sites=[tiled, _site("enc.self", "skipped", "bias")])
    assert rep.summary()["unmeasured"] == 1
    assert rep.flops_phrase() == ("attention FLOPs x0.250 of the 1 measured site(s) "
                                  "(1 unmeasured, not counted)")
    assert rep.flops_phrase() in str(rep)
    rep.sites.pop()
    assert rep.flops_phrase() == "attention FLOPs x0.250"


def test_merge_sites_keeps_one_entry_per_site():
    from nanite_compile.report import merge_sites

    first = _site("m.layers.0.attn")
    other = _site("m.layers.1.attn")
    merged = merge_sites([
        _site("m.layers.1.attn", "skipped", "no mask"),   # skipped, then rewritten
        first, other,
        _site("m.layers.0.attn"),                         # a later rewritten record
        _site("m.layers.0", "skipped", "graph break"),    # a frame inside layer 0
        _site("layers.1.attn", "skipped", "weights"),     # a frame of ``m``
        _site("m.head", "skipped", "not attention"),      # another site, never rewritten
        _site("m.head", "skipped", "still not"),
        _site("m.layers.10", "skipped", "x"),             # not a run of layer 1's path
    ])
    assert [s.site for s in merged] == ["m.layers.1.attn", "m.layers.0.attn", "m.head",
                                        "m.layers.10"]
    assert merged[1] is first and first.exact_variants == ["graph break"]
    assert merged[0] is other and other.exact_variants == ["no mask", "weights"]
    assert merged[2].reason == "still not" and merged[3].reason == "x"
    assert merge_sites(merged) == merged  # idempotent


def test_plain_module_is_captured_on_first_forward():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(1, 100, 32)
    with torch.no_grad():
        want = model(x)
        want64 = copy.deepcopy(model).double()(x.double())
    conv = nanite_compile.convert(model, budget=1.0, config=tile_cfg())
    before = nanite_compile.report(conv)
    assert before.sites == []
    assert before.notes and any("first forward" in n for n in before.notes), before.notes
    assert "note:" in str(before)
    with torch.no_grad():
        out = conv(x)
    after = nanite_compile.report(conv)
    assert {s.module_path for s in after.sites} == {"blocks.0", "blocks.1"}, after
    assert all(s.status == "rewritten" for s in after.sites)
    assert not after.notes
    assert_rounding_close(out, want, want64, torch.finfo(torch.float32).eps)


class NeedsExtraInput(TwoBlocks):
    """Looks like a Hugging Face model (a config and ``main_input_name``) but its forward
    needs an input the made-up probe does not have."""

    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=50, max_position_embeddings=256)
        self.embed = nn.Embedding(50, 32)

    def forward(self, input_ids, extra):
        return super().forward(self.embed(input_ids) + extra)


def test_a_probe_the_model_refuses_defers_capture_to_the_first_forward():
    """convert() must not fail where the model runs: when the probe forward raises (T5
    without decoder ids did), the sites are found at the first real forward, and the
    notes say why."""
    torch.manual_seed(0)
    model = NeedsExtraInput().eval()
    ids = torch.randint(0, 50, (1, 100), generator=torch.Generator().manual_seed(1))
    extra = torch.randn(1, 100, 32)
    with torch.no_grad():
        want = model(ids, extra)
    conv = nanite_compile.convert(model, budget=1.0, config=tile_cfg())
    before = nanite_compile.report(conv)
    assert before.sites == []
    assert any("probe forward failed (TypeError" in n for n in before.notes), before.notes
    with torch.no_grad():
        out = conv(ids, extra)
    after = nanite_compile.report(conv)
    assert {s.module_path for s in after.sites} == {"blocks.0", "blocks.1"}, after
    assert all(s.status == "rewritten" for s in after.sites)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_converts_without_calibration():
    """T5 needs decoder ids: the probe gives it the same tokens, so its attention is found at
    convert time (relative-bias self-attention left exact with the reason, cross-attention
    rewritten) and the converted model computes the original's outputs."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, d_kv=8)
    model = transformers.T5Model(cfg).eval()
    ids = torch.randint(2, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "decoder_input_ids": ids[:, :40]}
    with torch.no_grad():
        want = model(**kw).last_hidden_state
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    rep = nanite_compile.report(conv)
    assert not rep.notes, rep.notes
    kinds = {s.module_path.rsplit(".", 1)[-1]: s for s in rep.sites}
    assert kinds["SelfAttention"].status == "skipped"
    assert "additive score bias" in kinds["SelfAttention"].reason
    assert kinds["EncDecAttention"].status == "rewritten"
    assert len(rep.sites) == 6
    with torch.no_grad():
        out = conv(**kw).last_hidden_state
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_root_attention_module_is_captured_on_first_forward():
    """The model is itself the attention: its very first forward already runs converted."""
    torch.manual_seed(0)
    model = SDPAAttention().eval()
    x = torch.randn(1, 100, 32)
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    with recording() as rec, torch.no_grad():
        out = conv(x)
    assert torch.isfinite(out).all()
    assert len(nanite_compile.report(conv).sites) == 1
    assert rec, "the first forward did not run the tiled op"


def test_transformer_encoder_first_forward_runs_converted():
    """nn.TransformerEncoder in eval takes the MHA fast path unless convert turns it off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(1, 100, 32)
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    with recording() as rec, torch.no_grad():
        conv(x)
    assert len(nanite_compile.report(conv).sites) == 2
    assert len(rec) == 2, f"the first forward ran the op at {sorted(rec)}"


def test_calibration_long_tensor_for_hf_model(llama):
    cal = ids(96, batch=2, seed=5)
    conv = nanite_compile.convert(llama, budget=0.25, calibration=cal, config=tile_cfg())
    rep = nanite_compile.report(conv)
    assert {s.site for s in rep.sites} == LAYER_PATHS
    for s in rep.sites:
        assert s.measured_shape is not None and s.measured_shape[-2] == 96, s.measured_shape
    assert torch.isfinite(logits(conv, ids(150))).all()
    # an iterable of 1-D token tensors works too
    conv = nanite_compile.convert(
        llama, budget=0.25, calibration=[cal[0], cal[1]], config=tile_cfg()
    )
    assert all(s.measured_shape[-2] == 96 for s in nanite_compile.report(conv).sites)


@pytest.mark.parametrize("cal", [42, ["a", "b"]], ids=["int", "strings"])
def test_bad_calibration_is_a_type_error(llama, cal):
    with pytest.raises(TypeError, match="calibration"):
        nanite_compile.convert(llama, budget=0.25, calibration=cal)


def test_calibration_from_a_tokenizers_output(llama):
    """A tokenizer's output (BatchEncoding) is calibrated on as its input_ids; rows with
    padding become their unpadded tokens, right or left padded, so padding ids are never
    calibrated on as text."""
    from transformers import BatchEncoding

    from nanite_compile.api import _calibration_batches

    x = ids(96, batch=2, seed=5)
    whole = _calibration_batches(BatchEncoding({"input_ids": x, "attention_mask": torch.ones_like(x)}))
    assert len(whole) == 1 and torch.equal(whole[0], x)
    mask = torch.ones_like(x)
    mask[0, 80:] = 0  # right padding
    mask[1, :10] = 0  # left padding
    rows = _calibration_batches([BatchEncoding({"input_ids": x, "attention_mask": mask}), x[:1, :5]])
    assert [tuple(r.shape) for r in rows] == [(1, 80), (1, 86), (1, 5)]
    assert torch.equal(rows[0][0], x[0, :80]) and torch.equal(rows[1][0], x[1, 10:])
    # convert plans on the unpadded rows exactly as on them passed by hand
    enc = BatchEncoding({"input_ids": x, "attention_mask": mask})
    a = nanite_compile.convert(llama, budget=0.25, calibration=enc, config=tile_cfg())
    b = nanite_compile.convert(llama, budget=0.25, calibration=[x[:1, :80], x[1:, 10:]],
                               config=tile_cfg())
    assert ({s.site: s.plan for s in nanite_compile.report(a).sites}
            == {s.site: s.plan for s in nanite_compile.report(b).sites})
    assert torch.equal(logits(a, ids(150)), logits(b, ids(150)))


@pytest.mark.parametrize(("cal", "exc", "match"), [
    ({"attention_mask": torch.ones(1, 8)}, TypeError, r"has no 'input_ids'.*return_tensors='pt'"),
    ({"input_ids": [[1, 2, 3]]}, TypeError, r"'input_ids' as list, not a tensor"),
    ({"input_ids": torch.ones(1, 4, dtype=torch.long),
      "attention_mask": torch.tensor([[1, 0, 1, 1]])}, ValueError, r"row 0's attention_mask has gaps"),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long),
      "attention_mask": torch.zeros(2, 4)}, ValueError, r"all padding"),
    ({"input_ids": torch.ones(2, 4)}, ValueError, r"must be token ids"),
], ids=["no-ids", "lists", "gaps", "all-padding", "floats"])
def test_bad_tokenizer_output_is_a_clear_error(cal, exc, match):
    from nanite_compile.api import _calibration_batches

    with pytest.raises(exc, match=match):
        _calibration_batches(cal)


@pytest.mark.parametrize("objective", ["model", "site"])
def test_calibration_is_cut_to_the_models_position_table(objective):
    """A text longer than the model's context, given as one sequence, is calibrated on in
    pieces the model takes (GPT-2's position embedding raised IndexError inside convert)."""
    from nanite_compile.api import _context_limit

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert _context_limit(model) == 64
    # a RoBERTa-style table starts after its padding index (1): 66 rows take 64 tokens
    roberta = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=66)
    assert _context_limit(transformers.RobertaModel(roberta)) == 64
    assert _context_limit(nn.Linear(2, 2)) is None
    text = torch.randint(0, 100, (1, 200), generator=torch.Generator().manual_seed(3))
    conf = NaniteConfig(tile=8, objective=objective)
    conv = nanite_compile.convert(model, budget=0.25, calibration=text, config=conf)
    notes = " ".join(nanite_compile.report(conv).notes)
    assert "cut from sequences of up to 200 (the model's position table; the 8 past" in notes
    pieces = [text[:, i:i + 64] for i in (0, 64, 128)]
    ref = nanite_compile.convert(model, budget=0.25, calibration=pieces, config=conf)
    assert ({s.site: s.plan for s in nanite_compile.report(conv).sites}
            == {s.site: s.plan for s in nanite_compile.report(ref).sites})
    with torch.no_grad():
        assert torch.equal(conv(text[:, :64]).logits, ref(text[:, :64]).logits)


@pytest.mark.parametrize("bad", ["float", "out-of-vocab"])
def test_calibration_the_model_refuses_is_an_error(llama, bad):
    """Calibration the model cannot run is the user's input, not a made-up probe: an error
    that says so (it was swallowed as a failed probe, and the cost model never ran)."""
    x = ids(96)
    cal = x.float() if bad == "float" else x + VOCAB
    with pytest.raises(ValueError, match=r"forward failed on the first calibration tensor.*"
                                         r"LlamaForCausalLM takes as input_ids"):
        nanite_compile.convert(llama, budget=0.25, calibration=cal)
    # a later piece: the same, naming it
    with pytest.raises(ValueError, match=r"forward failed on calibration piece 1 \(shape \(1, 96\)"):
        nanite_compile.convert(llama, budget=0.25, calibration=[x, cal])


def test_a_model_in_training_mode_is_captured_in_eval_mode(tmp_path):
    """In training mode Llama's SDPA gets dropout_p as a run-time value (0.0), and every
    site was skipped as "dropout_p is not 0", so that load() onto a model in training
    mode failed too. Capture runs in eval mode; the model is handed back in the mode it
    came in. Its attention dropout is 0, so training-mode calls run tiled too (they ran
    the original attention until the rewrite guarded its graph on dropout_p == 0)."""
    model = _tiny_llama().train()
    conv = nanite_compile.convert(model, budget=0.25, config=tile_cfg())
    rep = nanite_compile.report(conv)
    assert [s.status for s in rep.sites] == ["rewritten", "rewritten"], rep
    assert any("captured in eval mode" in n for n in rep.notes), rep.notes
    assert conv.training and model.training
    x = ids(150)
    with recording() as rec, torch.no_grad():
        conv.eval()(input_ids=x)
    assert all(r["path"] == "tiled" for recs in rec.values() for r in recs), rec
    with torch.no_grad():
        want = conv(input_ids=x).logits
        with recording() as rec:
            torch.testing.assert_close(conv.train()(input_ids=x).logits, want)
    assert all(r["path"] == "tiled" for recs in rec.values() for r in recs), rec
    assert not any(s.exact_variants for s in nanite_compile.report(conv).sites)
    nanite_compile.save(conv, tmp_path)
    loaded = nanite_compile.load(tmp_path, _tiny_llama().train())
    assert [s.status for s in nanite_compile.report(loaded).sites] == ["rewritten", "rewritten"]


def test_a_converted_model_is_not_pickled_but_deep_copies(llama_quarter):
    """torch.save of the whole converted model pickled it without its captured forwards:
    torch.load gave back the original attention under a report saying "rewritten"."""
    import io

    with pytest.raises(TypeError, match=r"cannot be pickled.*nanite_compile\.save"):
        torch.save(llama_quarter, io.BytesIO())
    twin = copy.deepcopy(llama_quarter)
    x = ids(150, seed=3)
    with recording() as rec:
        out = logits(twin, x)
    assert sorted(rec) == sorted(LAYER_PATHS)
    assert all(r["path"] == "tiled" for recs in rec.values() for r in recs), rec
    torch.testing.assert_close(out, logits(llama_quarter, x), rtol=0, atol=0)
    twin.model.layers[0].self_attn.q_proj.weight.data.mul_(2)  # its own parameters
    assert not torch.equal(logits(twin, x), logits(llama_quarter, x))
    assert nanite_compile.report(twin).to_dict() == nanite_compile.report(llama_quarter).to_dict()


def test_a_sliding_window_over_budget_note_gives_the_right_advice():
    """A window narrower than the tiles it straddles reads more than the original at any
    length; the note said longer inputs would bring the reads down to the budget."""
    from tiny_models import shape_kwargs

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**shape_kwargs(
        vocab=VOCAB, hidden=32, layers=1, heads=4, max_pos=1024, num_key_value_heads=2,
        sliding_window=64, attn_implementation="sdpa"))
    conv = nanite_compile.convert(transformers.MistralForCausalLM(cfg).eval(), budget=0.25)
    (note,) = [n for n in nanite_compile.report(conv).notes if "more than their budget" in n]
    assert "sliding window (64 tokens)" in note and "smaller tile" in note, note
    assert "longer inputs" not in note, note


def test_reconverting_a_converted_model(llama, llama_quarter):
    x = ids(150, seed=7)
    want = logits(llama, x)
    conv1 = nanite_compile.convert(llama_quarter, budget=1.0, config=tile_cfg())
    assert "_nanite_state" in llama_quarter.__dict__
    assert nanite_compile.report(conv1).config["budget"] == 1.0
    assert nanite_compile.report(llama_quarter).config["budget"] == 0.25
    assert {s.site for s in nanite_compile.report(conv1).sites} == LAYER_PATHS
    assert_rounding_close(
        logits(conv1, x),
        want,
        logits(copy.deepcopy(llama).double(), x),
        torch.finfo(torch.float32).eps,
    )
    for p, q in zip(llama.parameters(), conv1.parameters(), strict=True):
        assert p.data_ptr() == q.data_ptr()


def test_import_does_not_import_triton():
    code = "import nanite_compile, sys; assert 'triton' not in sys.modules, 'triton imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("q_heads, kv_heads, want", [
    (9, 3, (32, 4, 1)),  # SmolLM2: 3 query heads per KV head
    (8, 1, (32, 4, 1)),
    (8, 4, (64, 2, 1)),  # 2 per KV head
    (8, 8, (64, 2, 1)),  # MHA
    (None, 8, (32, 4, 1)),  # unknown or symbolic counts: tile 32
    ("s0", 8, (32, 4, 1)),
])
def test_default_tiling_follows_the_heads(q_heads, kv_heads, want):
    """Left None, the tile is chosen from the query heads per KV head (short flash blocks
    and unshared gathers made tile 32 slower than SDPA for MHA) and the near field and
    anchors are 128 / 32 tokens (at least a tile); whatever the config sets is kept, and a set tile counts
    the near field and anchors in its own tiles (4 and 2, as before)."""
    assert NaniteConfig().tiling(q_heads, kv_heads) == want
    assert NaniteConfig(tile=16).tiling(q_heads, kv_heads) == (16, 4, 2)
    assert NaniteConfig(window=3).tiling(q_heads, kv_heads) == (want[0], 3, want[2])
    assert NaniteConfig(anchors=0).tiling(q_heads, kv_heads)[2] == 0
    with pytest.raises(ValueError, match="power of two"):
        NaniteConfig(tile=48)


def test_site_params_read_heads_from_4d_and_3d_shapes():
    """The rewrite reads the head counts from the matched q/k shapes: ``[B, H, N, D]``, or
    the ``[B*H, N, D]`` of 3-D bmm forms (their ratio is still the heads per KV head); a
    symbolic size gives tile 32; a saved per-site plan wins over the choice."""
    from nanite_compile.passes.base import PassContext
    from nanite_compile.passes.rewrite import site_params

    ctx = PassContext(NaniteConfig())
    assert site_params(ctx, "a", [1, 8, 100, 64], [1, 8, 100, 64]).tile == 64
    assert site_params(ctx, "a", [1, 9, 100, 64], [1, 3, 100, 64]).tile == 32
    assert site_params(ctx, "a", [16, 100, 64], [16, 100, 64]).tile == 64
    assert site_params(ctx, "a", [1, "s0", 100, 64], [1, 8, 100, 64]).tile == 32
    ctx = PassContext(NaniteConfig(), plans={"a": {"tile": 16}})
    p = site_params(ctx, "a", [1, 8, 100, 64], [1, 8, 100, 64])
    assert (p.tile, p.window, p.anchors) == (16, 4, 2)  # the plan's tile, counted as a set one


@pytest.mark.parametrize("heads, kv_heads, want", [(6, 2, 32), (4, 2, 64), (4, 4, 64)])
def test_conversion_picks_each_sites_tile_from_its_heads(heads, kv_heads, want):
    """convert() with the default config: every site's plan (the report's, and the one the
    op runs: the recorded level table has N / tile columns) has the tile its head counts
    call for; a saved config round-trips the None."""
    model = _tiny_llama(vocab=VOCAB, hidden=48, heads=heads, kv_heads=kv_heads, max_pos=1024)
    conv = nanite_compile.convert(model, budget=0.25)
    rep = nanite_compile.report(conv)
    assert rep.sites and all(
        (s.plan["tile"], s.plan["window"], s.plan["anchors"]) == (want, 128 // want, max(1, 32 // want))
        for s in rep.sites)
    x = torch.randint(0, VOCAB, (1, 384), generator=torch.Generator().manual_seed(0))
    with recording(levels=True) as rec, torch.no_grad():
        conv(x)
    tables = [r["levels"] for rs in rec.values() for r in rs]
    assert tables and all(t.shape[-1] == 384 // want for t in tables)
    assert NaniteConfig.from_json(NaniteConfig().to_json()).tile is None
    # the cost model's plans and a saved conversion keep the site's tile
    cfg = NaniteConfig(budget=0.3, plan_check=False)
    long = torch.randint(0, VOCAB, (1, 768), generator=torch.Generator().manual_seed(1))
    cal = nanite_compile.convert(model, config=cfg, calibration=[long[:, :512]])
    assert {s.plan["tile"] for s in nanite_compile.report(cal).sites} == {want}
    with recording(levels=True) as rec, torch.no_grad():
        cal(long)
    tables = [r["levels"] for rs in rec.values() for r in rs if "levels" in r]
    assert tables and all(t.shape[-1] == 768 // want for t in tables)


def test_config_max_level_reaches_the_level_table():
    """NaniteConfig.max_level is carried into every rewritten call and the report's plan:
    no kept tile of a recorded level table is pooled coarser than it; None lets the rule
    use every level, and an op call without the argument (a graph made before it
    existed) keeps every level too."""
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(1, 512, 32)
    seen = {}
    for cap in (0, 2, None):
        cfg = NaniteConfig(budget=0.2, tile=16, window=2, anchors=1, max_level=cap)
        conv = nanite_compile.convert(model, config=cfg)
        with recording(levels=True) as rec, torch.no_grad():
            conv(x)  # captured at the first forward (a plain module has no probe)
        assert {s.plan["max_level"] for s in nanite_compile.report(conv).sites} == {cap}
        tables = [r["levels"] for rs in rec.values() for r in rs]
        assert tables
        seen[cap] = max(int(t.max()) for t in tables)
    assert seen[0] == 0 and seen[2] == 2 and seen[None] > 2, seen
    q, k, v = torch.randn(1, 4, 512, 8), torch.randn(1, 4, 512, 8), torch.randn(1, 4, 512, 8)
    with recording(levels=True) as rec:
        torch.ops.nanite.tiled_attention(q, k, v, None, 8**-0.5, True, 16, 2, 1, -1, 0.2, 0, 16,
                                         0, "old_graph")
    assert int(rec["old_graph"][0]["levels"].max()) > 2


def test_config_select_reaches_the_op():
    """NaniteConfig(select="query") reaches every rewritten call: the report's plans say
    so, each query reads within the budget while its row computes the union of its
    queries' tiles, and the outputs differ from the row rule's (another selection)."""
    model = _tiny_llama(vocab=VOCAB, max_pos=512, impl="sdpa")
    x = torch.randint(0, VOCAB, (1, 384), generator=torch.Generator().manual_seed(0))
    outs = {}
    for select in ("row", "query"):
        cfg = NaniteConfig(budget=0.3, tile=16, window=2, anchors=1, select=select)
        conv = nanite_compile.convert(model, config=cfg)
        rep = nanite_compile.report(conv)
        assert {s.plan["select"] for s in rep.sites} == {select}
        # the report counts the work done: under "query" the union each row computes
        for s in rep.sites:
            work = s.reads_per_query if select == "row" else s.computed_per_query
            assert (s.computed_per_query is None) == (select == "row")
            assert s.flops_after == pytest.approx(s.flops_before * work / s.exact_reads_per_query)
        assert ("computed/orig" in str(rep)) == (select == "query")
        assert any("select='query'" in n for n in rep.notes) == (select == "query")
        if select == "query":
            assert all(s.computed_per_query > s.reads_per_query for s in rep.sites)
            again = RewriteReport.from_json(rep.to_json())
            assert [s.computed_per_query for s in again.sites] == [
                s.computed_per_query for s in rep.sites]
        with recording() as rec, torch.no_grad():
            outs[select] = conv(x).logits
        recs = [r for rs in rec.values() for r in rs]
        assert recs and all(r["path"] == "tiled" for r in recs)
        for r in recs:
            assert r["reads_per_query"] <= 0.3 * r["exact_reads_per_query"] + 16
            assert r["computed_per_query"] >= r["reads_per_query"]
    assert bool(torch.isfinite(outs["query"]).all())
    assert not torch.equal(outs["row"], outs["query"])
    with pytest.raises(ValueError, match="select must be one of"):
        NaniteConfig(select="token")


def test_config_row_tiles_reaches_the_op():
    """NaniteConfig(row_tiles=2): every site's plan says so, each pair of query tiles reads
    the same entries before the pair (the recorded tables), within the budget, with no
    output depending on a later token, and the outputs differ from rows of one tile."""
    model = _tiny_llama(vocab=VOCAB, hidden=48, heads=6, kv_heads=2, max_pos=1024)
    x = torch.randint(0, VOCAB, (1, 700), generator=torch.Generator().manual_seed(0))
    outs = {}
    for rt in (1, 2):
        cfg = NaniteConfig(budget=0.3, tile=16, window=2, anchors=1, row_tiles=rt)
        conv = nanite_compile.convert(model, config=cfg)
        assert {s.plan["row_tiles"] for s in nanite_compile.report(conv).sites} == {rt}
        with recording(levels=True) as rec, torch.no_grad():
            outs[rt] = conv(x).logits
        recs = [r for rs in rec.values() for r in rs]
        assert recs and all(r["path"] == "tiled" for r in recs)
        for r in recs:
            assert r["reads_per_query"] <= 0.3 * r["exact_reads_per_query"] + 16
            lv = r["levels"]  # [Hkv, mq, mk]
            m = lv.shape[1] // 2 * 2
            before = torch.arange(lv.shape[-1])[None, :] < torch.arange(0, m, 2)[:, None]
            same = ((lv[:, 0:m:2] == lv[:, 1:m:2]) | ~before).all()
            assert bool(same) == (rt == 2)
        if rt == 2:
            changed = x.clone()
            changed[:, -40:] = (changed[:, -40:] + 5) % VOCAB
            with torch.no_grad():
                later = conv(changed).logits
            torch.testing.assert_close(later[:, :-40], outs[2][:, :-40], rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[1], outs[2])
    with pytest.raises(ValueError, match="row_tiles must be 1"):
        NaniteConfig(row_tiles=3)


def test_config_impl_reaches_the_op(monkeypatch):
    """NaniteConfig.impl is carried into every rewritten call: 'torch' runs PyTorch on the
    CPU; 'triton' on CPU tensors without the interpreter fails with the fix in the message."""
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(1, 96, 32)
    with torch.no_grad():
        want = model(x)
    for impl in ("torch", "triton"):
        cfg = NaniteConfig(budget=0.5, tile=16, window=2, anchors=1, impl=impl)
        conv = nanite_compile.convert(model, config=cfg)
        if impl == "torch":
            with recording() as rec, torch.no_grad():
                got = conv(x)
            assert {r["impl"] for rs in rec.values() for r in rs} == {"cpu"}
            assert torch.isfinite(got).all() and (got - want).norm() < 0.5 * want.norm()
        else:
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            with pytest.raises(RuntimeError, match="impl='triton'"), torch.no_grad():
                conv(x)
