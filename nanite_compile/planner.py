"""The cost model: one global budget, spent per site where it buys the most accuracy.

Calibration runs the converted model with every site exact while each site
records its inputs (``kernels.ops.collecting``). For every site the planner
then measures, on those inputs, the relative error of its output and the key
reads it spends at a ladder of budgets (`measure_site`), and chooses one
budget per site (`allocate`) that minimises the summed squared error (the
variance of the noise the sites add to the residual stream, to first order)
subject to one constraint: the reads of all sites together stay within
``budget`` times the original attention's reads. It is the multiple-choice
knapsack of DESIGN.md section 2, solved on its convex hull by a Lagrange
multiplier and finished greedily with what is left.

What is summed is `SiteCurve.objective`: the squared errors above
(``NaniteConfig(objective="site")``), or, by default, each site's end-to-end
cost: how far the model's output moves from the original's when that site
alone runs at the candidate budget (`nanite_compile.sensitivity`), measured by
``convert`` on the calibration tokens for the candidates around the uniform
budget.

A site whose error stays above ``max_error`` at the budget it can afford is
kept exact; the others share what remains. Everything returned is plain data
(`SitePlan`), serialised with the report and by ``nanite_compile.save``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .kernels import cpu as _cpu
from .kernels.levels import TileParams
from .kernels.reference import exact_attention, tiled_attention

# the budget ladder tried per site (1.0 = exact is always a candidate)
LADDER = (0.05, 0.1, 0.15, 0.25, 0.4, 0.6)


@dataclass
class SiteCurve:
    """Measured error and cost of one site at each candidate budget.

    Attributes:
        site: the site's report name.
        budgets: candidate budgets, ascending, the last one 1.0 (exact).
        errors: relative L2 error of the site's output (over all its samples) per budget.
        reads: key reads spent (summed over the samples' queries) per budget.
        exact_reads: key reads of the original attention on the same samples.
        costs: what the plan sums and minimises, per budget. None: ``errors``
            squared (each site's own output error); the end-to-end objective
            (`nanite_compile.sensitivity`) puts here how much the model's output
            moves away from the original's when this site alone runs at each
            budget and every other site at the uniform one (it may be negative:
            a site read at a lower budget can make the model's output closer;
            ``math.inf`` for a budget not measured, never chosen unless
            ``max_error`` keeps the site exact).
    """

    site: str
    budgets: list[float]
    errors: list[float]
    reads: list[float]
    exact_reads: float
    costs: list[float] | None = None

    def objective(self) -> list[float]:
        """The per-budget cost the planner sums (``costs``, else squared errors)."""
        return list(self.costs) if self.costs is not None else [e * e for e in self.errors]


@dataclass
class SitePlan:
    """What the cost model chose for one site (plain data)."""

    site: str
    budget: float
    error: float
    reads: float
    exact_reads: float
    share: float = 0.0  # this site's reads / all sites' reads
    kept_exact: str = ""  # why the site stays exact, when it does
    # the end-to-end objective's cost at the chosen budget (None: per-site errors planned)
    model_cost: float | None = None

    def to_plan_entries(self) -> dict:
        """Entries merged into the site's plan dict (report, save)."""
        out = {"budget": self.budget, "calibration_error": round(self.error, 6),
               "budget_share": round(self.share, 6)}
        if self.model_cost is not None:
            out["model_cost"] = float(f"{self.model_cost:.6g}")
        if self.kept_exact:
            out["kept_exact"] = self.kept_exact
        return out


@dataclass
class Plan:
    """The cost model's choice for every site, and the totals it was held to."""

    sites: dict[str, SitePlan] = field(default_factory=dict)
    budget: float = 1.0
    reads: float = 0.0
    exact_reads: float = 0.0
    # the share every site's cheapest candidate reads: above ``budget``, no plan of these
    # samples meets it (their near field, anchors and summaries alone overshoot)
    floor: float = 0.0

    @property
    def realised(self) -> float:
        return self.reads / self.exact_reads if self.exact_reads else 1.0


def candidate_budgets(ladder: Sequence[float]) -> list[float]:
    """The budgets `measure_site` tries for ``ladder``, in its order: those below 1.0
    ascending, then 1.0 (exact)."""
    return sorted({float(b) for b in ladder if 0.0 < b < 1.0}) + [1.0]


def measure_site(
    site: str,
    samples: Sequence[tuple],
    params: TileParams,
    *,
    seed: int = 0,
    ladder: Sequence[float] = LADDER,
) -> SiteCurve:
    """Error and reads of one site at each budget of ``ladder`` (and 1.0), on its samples.

    Each candidate's budget in the result is the share of reads it realised
    (at least its nominal budget), so a plan made at one length spends the
    same share at another.

    Args:
        site: the site's name.
        samples: ``(q, k, v, attn_mask, scale, is_causal)`` tuples the site was called with.
        params: the site's plan; only its budget varies.
        seed: the random-feature seed the op uses.
        ladder: budgets below 1.0 to try.
    """
    budgets = candidate_budgets(ladder)
    sq_err = [0.0] * len(budgets)
    reads = [0.0] * len(budgets)
    ref_sq = 0.0
    exact_total = 0.0
    for q, k, v, mask, scale, causal in samples:
        ref = exact_attention(q, k, v, mask, scale, causal).float()
        ref_sq += float(ref.pow(2).sum())
        nq = q.shape[0] * q.shape[1] * q.shape[2]
        exact_here = None
        uncounted = []  # candidates that ran exact without a count: the sample's exact reads
        reuse: dict = {}  # density and mass estimate, shared by the ladder's budgets
        for i, b in enumerate(budgets):
            if b >= 1.0:
                continue
            st: dict = {}
            out = tiled_attention(q, k, v, mask, scale=scale, is_causal=causal,
                                  params=dataclasses.replace(params, budget=b, budget_reads=None), seed=seed, stats=st,
                                  fast=_cpu, reuse=reuse).float()
            sq_err[i] += float((out - ref).pow(2).sum())
            er = st.get("exact_reads_per_query")
            if st.get("path") == "tiled":
                reads[i] += float(st["reads_per_query"]) * nq
                exact_here = er
            elif er is None:  # ran exact without a count (too short): counted below
                uncounted.append(i)
            else:  # ran exact (a mask it cannot read): costs the original
                reads[i] += float(er) * nq
                exact_here = er
        if exact_here is None:  # every candidate ran exact without a count: count keys
            exact_here = float(k.shape[2]) if not causal else (k.shape[2] + 1) / 2.0
        for i in uncounted:
            reads[i] += float(exact_here) * nq
        exact_total += float(exact_here) * nq
        reads[-1] += float(exact_here) * nq
    errors = [math.sqrt(e / ref_sq) if ref_sq > 0 else 0.0 for e in sq_err]
    errors[-1] = 0.0
    # A candidate is labelled with the share of reads it really spent: at the
    # calibration length a small budget can be all mandatory reads (near field,
    # anchors, one summary per tile), and the plan must spend the same share at
    # any other length, not the smaller nominal one.
    if exact_total > 0:
        budgets = [min(1.0, max(b, round(r / exact_total, 4))) for b, r in
                   zip(budgets, reads, strict=True)]
    return SiteCurve(site, budgets, errors, reads, exact_total)


def _choose(curves: list[SiteCurve], lam: float, fixed: dict[str, int], total: float) -> list[int]:
    """Per site, the candidate minimising ``cost + lam * reads / total``."""
    out = []
    for c in curves:
        if c.site in fixed:
            out.append(fixed[c.site])
            continue
        cost = [e + lam * r / total for e, r in zip(c.objective(), c.reads, strict=True)]
        out.append(min(range(len(cost)), key=lambda i: (cost[i], c.reads[i])))
    return out


def allocate(curves: list[SiteCurve], budget: float, max_error: float | None = None) -> Plan:
    """One budget per site: least summed cost within ``budget`` of all reads.

    The cost of a site at a budget is `SiteCurve.objective`: its output's squared
    relative error, or the end-to-end cost the sensitivity sweep measured.

    Args:
        curves: `measure_site` results, one per site.
        budget: the global fraction of the original reads, in ``(0, 1]``.
        max_error: sites whose error exceeds it at their chosen budget are kept
            exact (and the others re-planned with what is left); None: no bound.

    Returns:
        A `Plan`. When even the cheapest candidate of every site overshoots
        ``budget``, every site gets its cheapest candidate (the plan says so
        through ``Plan.realised``).
    """
    if not curves:
        return Plan(budget=budget)
    total_exact = sum(c.exact_reads for c in curves)
    target = budget * total_exact
    fixed: dict[str, int] = {}
    reasons: dict[str, str] = {}
    while True:
        pick = _solve(curves, target, fixed)
        over = [(c, i) for c, i in zip(curves, pick, strict=True)
                if max_error is not None and c.site not in fixed and c.errors[i] > max_error]
        if not over:
            break
        for c, i in over:
            fixed[c.site] = len(c.budgets) - 1
            reasons[c.site] = (f"error {c.errors[i]:.3f} at budget {c.budgets[i]:g} is above "
                               f"max_error {max_error:g}")
    plan = Plan(budget=budget, exact_reads=total_exact,
                floor=sum(min(c.reads) for c in curves) / total_exact if total_exact else 0.0)
    used = sum(c.reads[i] for c, i in zip(curves, pick, strict=True))
    plan.reads = used
    for c, i in zip(curves, pick, strict=True):
        plan.sites[c.site] = SitePlan(
            site=c.site, budget=c.budgets[i], error=c.errors[i], reads=c.reads[i],
            exact_reads=c.exact_reads, share=c.reads[i] / used if used else 0.0,
            kept_exact=reasons.get(c.site, ""),
            model_cost=(c.costs[i] if c.costs is not None and math.isfinite(c.costs[i])
                        else None),
        )
    return plan


def _solve(curves: list[SiteCurve], target: float, fixed: dict[str, int]) -> list[int]:
    """Lagrangian choice on the convex hull, then greedy upgrades with what is left."""
    def reads_of(pick):
        return sum(c.reads[i] for c, i in zip(curves, pick, strict=True))

    cheapest = [fixed.get(c.site, min(range(len(c.reads)), key=lambda i: c.reads[i]))
                for c in curves]
    if reads_of(cheapest) >= target:
        return cheapest
    total = sum(c.exact_reads for c in curves)
    lo, hi = 1e-12, 1.0
    while reads_of(_choose(curves, hi, fixed, total)) > target and hi < 1e12:
        hi *= 4.0
    if reads_of(_choose(curves, lo, fixed, total)) <= target:
        hi = lo
    for _ in range(100):  # geometric bisection for the smallest multiplier that fits
        if hi / lo < 1.0 + 1e-9:
            break
        mid = math.sqrt(lo * hi)
        if reads_of(_choose(curves, mid, fixed, total)) > target:
            lo = mid
        else:
            hi = mid
    pick = _choose(curves, hi, fixed, total)
    # greedy: upgrade the site with the best error drop per extra read that still fits
    left = target - reads_of(pick)
    costs = [c.objective() for c in curves]
    while True:
        best = None
        for n, (c, i) in enumerate(zip(curves, pick, strict=True)):
            if c.site in fixed:
                continue
            for j in range(len(c.budgets)):
                extra = c.reads[j] - c.reads[i]
                gain = costs[n][i] - costs[n][j]
                if extra <= 0 or gain <= 0 or extra > left:
                    continue
                rate = gain / extra
                if best is None or rate > best[0]:
                    best = (rate, n, j, extra)
        if best is None:
            return pick
        _, n, j, extra = best
        pick[n] = j
        left -= extra


def plan_sites(
    collected: dict[str, list[tuple]],
    params_of: Callable[[str], TileParams],
    budget: float,
    *,
    seed: int = 0,
    max_error: float | None = None,
    ladder: Sequence[float] = LADDER,
    progress: Callable[[str], None] | None = None,
) -> tuple[Plan, list[SiteCurve]]:
    """Measure every collected site and allocate ``budget`` across them.

    Args:
        collected: site name -> input samples (``kernels.ops.collecting``).
        params_of: the site's base plan.
        budget: global budget fraction.
        seed: random-feature seed.
        max_error: see `allocate`.
        ladder: candidate budgets.
        progress: called with each site's name after it is measured.
    """
    curves = []
    with torch.no_grad():
        for site, samples in collected.items():
            if not samples:
                continue
            curves.append(measure_site(site, samples, params_of(site), seed=seed, ladder=ladder))
            if progress is not None:
                progress(site)
    return allocate(curves, budget, max_error), curves
