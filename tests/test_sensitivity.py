"""The end-to-end objective: each site's effect on the model's output (sensitivity.py),
the planner spending by it, and replaying the blocks before a changed site."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")

from test_api import SDPAAttention  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

import nanite_compile  # noqa: E402
from nanite_compile import NaniteConfig, api, evaluate, planner, sensitivity  # noqa: E402
from nanite_compile.kernels import ops  # noqa: E402
from nanite_compile.passes.rewrite import site_params  # noqa: E402

VOCAB = 96
# near field and anchors are 3 of the 24 tiles at 384 tokens: the budget bites
CFG = dict(tile=16, window=2, anchors=1, budget=0.3, plan_check=False)


def ids(n, seed):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _sweep_of(conv, x, candidates=(0.12, 0.3, 0.75, 1.0)):
    """`sensitivity.sweep` over every rewritten site of ``conv`` on tokens ``x``."""
    state = conv.__dict__["_nanite_state"]
    index = api._site_index(state)
    sites = {s: (s + state.tag, site_params(be.context(), s)) for s, (be, _) in index.items()}

    def run():
        return conv(input_ids=x, use_cache=False)

    return sensitivity.sweep(conv, run, sites, {s: list(candidates) for s in sites})


@pytest.fixture(scope="module")
def converted():
    model = tiny_llama(vocab=VOCAB, layers=4, max_pos=512, seed=3)
    return model, nanite_compile.convert(model, config=NaniteConfig(**CFG))


def test_replayed_sweep_equals_full_forwards(converted, monkeypatch):
    """Running each changed forward from the changed site's block gives the costs the full
    forwards give (the blocks before it are replayed, not recomputed)."""
    _, conv = converted
    x = ids(384, 7)
    fast = _sweep_of(conv, x)
    assert fast.replayed and fast.kind == "kl"
    monkeypatch.setattr(sensitivity, "_block_of", lambda model, site: None)
    full = _sweep_of(conv, x)
    assert not full.replayed
    assert full.base == pytest.approx(fast.base, rel=1e-9, abs=0)
    assert full.costs.keys() == fast.costs.keys() and len(full.costs) == 4
    for site, by_budget in full.costs.items():
        for b, cost in by_budget.items():
            assert fast.costs[site][b] == pytest.approx(cost, rel=1e-6, abs=1e-12), (site, b)
    # the sweep measured something: exact reads bring the output back toward the original
    assert fast.base > 0
    assert sum(c[1.0] for c in fast.costs.values()) < 0
    assert all(c[0.3] == 0.0 for c in fast.costs.values())  # the uniform budget itself
    # one forward per site and non-uniform candidate, the reference, the uniform and the check
    assert fast.forwards == 3 + 3 * 4 and full.forwards == 2 + 3 * 4


def test_the_distance_is_the_next_token_kl_on_the_second_half(converted):
    """base is KL(original || uniform) of the next-token distribution, averaged over the
    positions of the second half (every second one), computed here directly from the two
    models' logits."""
    model, conv = converted
    x = ids(384, 8)
    sw = _sweep_of(conv, x, candidates=(0.3,))
    with torch.no_grad():
        p = F.log_softmax(model(x).logits[0, 192::2].double(), -1)
        q = F.log_softmax(conv(x).logits[0, 192::2].double(), -1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert sw.base == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("step", [1, 2])
def test_the_kl_keeps_small_differences(step):
    """The costs are differences of KLs a few thousandths apart on logits of size ~10: the
    float32 distance must give them as float64 does (the plain formula in float32,
    sum p log p - sum p z + logsumexp z, loses them). Over the second half of the
    positions, every ``step``-th."""
    class _LM(nn.Module):
        def can_generate(self):
            return True

    g = torch.Generator().manual_seed(0)
    ref = 4.0 * torch.randn(1, 600, 20000, generator=g) + 12.0
    noise = torch.randn(1, 600, 20000, generator=g)
    outs = [ref + 0.05 * noise, ref + 0.0502 * noise, ref + 0.3 * noise]
    dist = sensitivity._Distance(_LM(), types.SimpleNamespace(logits=ref), positions_from=0.5,
                                 positions_step=step)

    def direct(z):
        p = F.log_softmax(ref[:, 300::step].double(), -1)
        q = F.log_softmax(z[:, 300::step].double(), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    got = [dist(types.SimpleNamespace(logits=z)) for z in outs]
    want = [direct(z) for z in outs]
    assert got == pytest.approx(want, rel=1e-5)
    assert got[1] - got[0] == pytest.approx(want[1] - want[0], rel=1e-3)  # ~1e-5 nats
    assert got[2] - got[0] == pytest.approx(want[2] - want[0], rel=1e-5)


def test_the_sweep_leaves_every_site_plan_as_it_was(converted):
    _, conv = converted
    state = conv.__dict__["_nanite_state"]
    keys = [s + state.tag for s in api._site_index(state)]
    before = {k: ops.site_plan(k) for k in keys}
    x = ids(200, 2)
    with torch.no_grad():
        want = conv(x).logits
    _sweep_of(conv, x)
    assert {k: ops.site_plan(k) for k in keys} == before
    for block in conv.model.layers:  # replay put every forward back
        assert "forward" not in block.__dict__
    with torch.no_grad():
        torch.testing.assert_close(conv(x).logits, want, rtol=0, atol=0)


class _Block(SDPAAttention):
    """test_api's causal SDPA attention, with a residual."""

    def forward(self, x):
        return x + super().forward(x)


class _Reversed(nn.Module):
    """A plain module whose stack runs last block first: a block's input depends on
    blocks after it in the list, so nothing may be replayed."""

    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([_Block() for _ in range(n)])

    def forward(self, x):
        for b in reversed(self.blocks):
            x = b(x)
        return x


class _InOrder(_Reversed):
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class _InPlace(_Reversed):
    """Each block adds to its input in place (allowed without autograd)."""

    def forward(self, x):
        x = x * 1.0
        for b in self.blocks:
            x += b(x) - x
        return x


@pytest.mark.parametrize("cls, replayed", [(_InOrder, True), (_Reversed, False),
                                           (_InPlace, True)])
def test_replay_only_for_a_stack_run_in_order(cls, replayed, monkeypatch):
    """A module that is no language model is measured by the relative error of its output;
    its stack is replayed only when run in list order, and the costs are those of full
    forwards either way."""
    model = cls().eval()
    torch.manual_seed(1)
    x = torch.randn(1, 512, 32)  # the budget fits: at 256 tokens the floor is x0.37
    conv = nanite_compile.convert(model, config=NaniteConfig(**CFG), calibration=x)
    state = conv.__dict__["_nanite_state"]
    index = api._site_index(state)
    assert len(index) == 3
    sites = {s: (s + state.tag, site_params(be.context(), s)) for s, (be, _) in index.items()}

    def sweep():
        return sensitivity.sweep(conv, lambda: conv(x), sites,
                                 {s: [0.12, 0.3, 1.0] for s in sites})

    got = sweep()
    assert got.kind == "rel" and got.replayed is replayed and got.base > 0
    monkeypatch.setattr(sensitivity, "_block_of", lambda model, site: None)
    full = sweep()
    for site in sites:
        for b in (0.12, 1.0):
            assert got.costs[site][b] == pytest.approx(full.costs[site][b], rel=1e-6, abs=1e-15)
    # and convert's plan came from the same measurement: a note says so
    assert any("relative output error" in n for n in nanite_compile.report(conv).notes)


def test_calibration_plans_by_the_model_objective():
    """convert(calibration=...) with the default objective: every site's plan carries its
    end-to-end cost, the plan stays within the budget, the note names the sweep, and
    objective="site" plans by the sites' own errors as before (no model cost)."""
    model = tiny_llama(vocab=VOCAB, layers=3, max_pos=512, seed=3)
    calib = [ids(384, 1)]
    conv = nanite_compile.convert(model, config=NaniteConfig(**CFG), calibration=calib)
    state = conv.__dict__["_nanite_state"]
    rep = nanite_compile.report(conv)
    assert state.plan is not None
    assert state.plan.reads <= 0.3 * state.plan.exact_reads * (1 + 1e-9)
    for s in (s for s in rep.sites if s.status == "rewritten"):
        assert math.isfinite(s.plan["model_cost"])
        assert ops.site_plan(s.site + state.tag).budget == s.plan["budget"]
    note = next(n for n in rep.notes if n.startswith("cost model"))
    assert "next-token KL against the original on 384 tokens" in note
    assert "blocks replayed" in note
    # reference, uniform, replay check, and 2 candidates (0.12, 0.75; not exact) per site
    assert f"{3 + 2 * 3} forwards" in note
    assert all(s.plan["budget"] < 1.0 for s in rep.sites if s.status == "rewritten")
    by_site = nanite_compile.convert(model, config=NaniteConfig(**CFG, objective="site"),
                                     calibration=calib)
    assert all("model_cost" not in s.plan for s in nanite_compile.report(by_site).sites)
    assert not any("effect on the model" in n for n in nanite_compile.report(by_site).notes)


def test_calibration_plans_at_plan_tokens(monkeypatch):
    """Token sequences longer than ``plan_tokens`` are cut into pieces of it: collection,
    sweep, loss check and probe all run at that length (a candidate's reads depend on
    it), and the plan is the one the pieces give as a list. None sweeps at the whole
    length."""
    model = tiny_llama(vocab=VOCAB, layers=2, max_pos=1024, seed=3)
    seen = []  # sequence lengths the first layer ran on
    model.model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(
        (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    x = ids(768, 4)
    cfg = NaniteConfig(**CFG, plan_tokens=384)

    def plans(conv):
        return {s.site: s.plan for s in nanite_compile.report(conv).sites}

    def note(conv):
        return next(n for n in nanite_compile.report(conv).notes if n.startswith("cost model"))

    cut = nanite_compile.convert(model, config=cfg, calibration=x)
    assert cut.__dict__["_nanite_state"].plan is not None, note(cut)
    assert "on 384 tokens" in note(cut)
    assert "cut from sequences of up to 768 (plan_tokens)" in note(cut)
    assert set(seen) == {160, 384}  # the capture probe, then pieces only (no 768)
    pieces = nanite_compile.convert(model, config=cfg, calibration=[x[:, :384], x[:, 384:]])
    assert plans(pieces) == plans(cut)
    assert "cut from" not in note(pieces)
    seen.clear()
    whole = nanite_compile.convert(model, config=cfg.replace(plan_tokens=None), calibration=x)
    assert "on 768 tokens" in note(whole) and "cut from" not in note(whole)
    assert 768 in seen
    checked = []  # the loss check, uniform and planned, on the first piece
    nll = api._calibration_nll
    monkeypatch.setattr(api, "_calibration_nll",
                        lambda m, t: checked.append(t.shape[1]) or nll(m, t))
    nanite_compile.convert(model, config=cfg.replace(plan_check=True), calibration=x)
    assert checked == [384, 384]
    # a shorter last piece would be measured at another length: it is left out
    tail = nanite_compile.convert(model, config=cfg, calibration=ids(385, 4))
    assert plans(tail) == plans(nanite_compile.convert(model, config=cfg,
                                                       calibration=ids(385, 4)[:, :384]))
    assert "the 1 past the last whole piece unused" in note(tail)


def test_the_planner_spends_by_the_costs_not_the_errors():
    """Two sites, reads for one upgrade (10 + 25 of 200): the site whose upgrade lowers the model's cost gets
    it, though the other's own error falls more; without costs the errors decide."""
    def curve(name, errors, costs):
        return planner.SiteCurve(name, [0.1, 0.25, 1.0], errors, [10.0, 25.0, 100.0], 100.0,
                                 costs=costs)

    a = curve("a", [0.9, 0.5, 0.0], [0.0, -0.001, -0.002])  # loud, but the model does not care
    b = curve("b", [0.3, 0.2, 0.0], [0.05, 0.0, -0.04])  # quiet, and the model needs it
    plan = planner.allocate([a, b], budget=0.175)  # 35 of 200 reads
    assert plan.sites["b"].budget == 0.25 and plan.sites["a"].budget == 0.1
    assert plan.sites["b"].model_cost == 0.0 and plan.sites["a"].model_cost == 0.0
    for c in (a, b):
        c.costs = None
    plan = planner.allocate([a, b], budget=0.175)  # 35 of 200 reads
    assert plan.sites["a"].budget == 0.25 and plan.sites["b"].budget == 0.1
    assert plan.sites["a"].model_cost is None


def test_objective_is_checked():
    with pytest.raises(ValueError, match=r"objective must be one of \('model', 'site'\)"):
        NaniteConfig(objective="kl")
    assert NaniteConfig.from_json(NaniteConfig(objective="site").to_json()).objective == "site"


def test_model_candidates_bracket_the_budget():
    assert api._model_candidates(0.25) == (0.1, 0.25, 0.625)
    assert api._model_candidates(0.1) == (0.04, 0.1, 0.25)
    assert api._model_candidates(0.5) == (0.2, 0.5)  # measure_site adds 1.0 (not swept)


def test_an_unmeasured_budget_is_never_chosen():
    """A cost of inf (exact, which the sweep skips) is not chosen though the reads allow
    it; max_error can still keep the site exact, and its model cost is then unknown."""
    c = planner.SiteCurve("a", [0.1, 0.25, 1.0], [0.5, 0.3, 0.0], [10.0, 25.0, 100.0], 100.0,
                          costs=[0.2, 0.1, math.inf])
    plan = planner.allocate([c], budget=1.0)
    assert plan.sites["a"].budget == 0.25 and plan.sites["a"].model_cost == 0.1
    plan = planner.allocate([c], budget=1.0, max_error=0.2)
    assert plan.sites["a"].budget == 1.0 and plan.sites["a"].kept_exact
    assert plan.sites["a"].model_cost is None
    assert "model_cost" not in plan.sites["a"].to_plan_entries()


@pytest.mark.parametrize("indices", [True, False])
def test_convert_sweep_keeps_only_the_compared_logits(converted, indices, monkeypatch):
    """convert's sweep asks a Hugging Face LM for the logits of the compared positions only
    (``logits_to_keep``: their indices, every second one of the second half, or where the
    model takes only a count, the second half); the distances are those of the full
    logits. Exact is not swept."""
    if not indices:  # a model whose logits_to_keep is annotated as int only
        takes = evaluate.forward_takes
        monkeypatch.setattr(evaluate, "forward_takes",
                            lambda m, n, annotated=None: annotated is None and takes(m, n))
    _, conv = converted
    state = conv.__dict__["_nanite_state"]
    x = ids(384, 11)
    sites = list(api._site_index(state))
    ladder = (0.12, 0.3, 0.75)
    kept = []
    init = sensitivity._Distance.__init__

    def spy(self, model, ref, *a, **k):
        kept.append(ref.logits.shape[1])
        init(self, model, ref, *a, **k)

    monkeypatch.setattr(sensitivity._Distance, "__init__", spy)
    got = api._model_sweep(conv, state, x, sites, ladder)
    assert kept == [96 if indices else 192]  # positions 192, 194, ... or 192..383
    want = _sweep_of(conv, x, candidates=list(ladder))  # exact is not swept
    assert got.tokens == 384 and got.kind == "kl"
    assert got.base == pytest.approx(want.base, rel=1e-6)
    for site in sites:
        for b, cost in want.costs[site].items():
            assert got.costs[site][b] == pytest.approx(cost, rel=1e-5, abs=1e-12)
        assert 1.0 not in got.costs[site]
