"""End-to-end sensitivity: what each site's budget does to the model's output.

The per-site cost model (`planner.measure_site`) plans by each attention's own
output error. On SmolLM2 that is the wrong signal: the layers' errors compound
and cancel (reading layer 5 exactly *raises* perplexity; the 30 single-layer
gains sum to a third of reading all of them exactly), and the calibrated plan
came out worse than the uniform budget (BENCHMARKS.md, "Where each layer's
reads pay"). This module measures the signal the plan should follow instead,
on the calibration tokens:

1. the reference: one forward with every site exact (the original model);
2. the uniform conversion: every site at the config's budget; its distance to
   the reference is the baseline;
3. for each site and each candidate budget: that site alone at the candidate,
   every other site uniform; the candidate's *cost* is how much the distance
   grows over the baseline (negative where the model's output comes closer).

The distance is the KL divergence of the next-token distribution from the
original's, averaged over every second position of the second half, for a model whose
output has ``logits`` and that generates; otherwise the relative squared error
of its first output tensor. The planner (`planner.allocate`) then spends the
budget by these costs, assuming they add up across sites, which is where this
stays an approximation.

A forward that changes only site ``s`` computes everything before ``s``'s block
as the uniform forward did. Where the sites sit in a stack of blocks (an
``nn.ModuleList`` called in order, once each, as a decoder's layers are), the
blocks before ``s``'s are *replayed*: they return what they returned in the
uniform forward, and only ``s``'s block onward runs (half a forward on average).
Replay is used only after it reproduces the uniform forward's output exactly;
otherwise every forward runs in full.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from .kernels import ops as _ops
from .kernels.levels import TileParams

# the distance is averaged over positions from this fraction of the sequence on:
# the first positions see little beyond the near field and anchors, which every
# candidate reads exactly
DISTANCE_FROM = 0.5
# ... at every DISTANCE_STEP-th of those positions: neighbouring tokens' distributions
# move together, and the output layer over them is a sixth of a sweep forward (SmolLM2 at
# 4096 tokens, budget 0.25: the same plan from every second position as from all, the
# sweep 361 s against 417-478 s)
DISTANCE_STEP = 2
_CHUNK = 256  # positions per log-softmax (scratch memory)


@dataclass
class Sweep:
    """What `sweep` measured (plain data).

    Attributes:
        kind: ``"kl"`` (next-token KL against the original, nats per position)
            or ``"rel"`` (relative squared error of the output).
        base: the uniform conversion's distance to the original.
        costs: site -> {candidate budget: distance with that site there - base}.
        forwards: forwards run (reference, uniform and one per candidate).
        replayed: whether the blocks before a changed site were replayed.
        seconds: wall time of the sweep.
        tokens: sequence length of the forwards (set by the caller).
    """

    kind: str
    base: float
    costs: dict[str, dict[float, float]] = field(default_factory=dict)
    forwards: int = 0
    replayed: bool = False
    seconds: float = 0.0
    tokens: int = 0


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in an output (a tensor, a tuple, a dict, a ``ModelOutput``)."""
    return next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)


class _Distance:
    """The distance of an output from the reference output it was built with."""

    def __init__(self, model: nn.Module, ref: Any, positions_from: float = DISTANCE_FROM,
                 positions_step: int = DISTANCE_STEP) -> None:
        logits = getattr(ref, "logits", None)
        gen = getattr(model, "can_generate", None)
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and callable(gen) and gen():
            self.kind = "kl"
            self.start = min(int(logits.shape[1] * positions_from), logits.shape[1] - 1)
            self.step = max(1, int(positions_step))
            # with d = z - zr the change of the logits from the reference's zr, and p the
            # reference's probabilities: KL(p || softmax(z)) = log sum p e^d - sum p d, both
            # terms of the size of the KL itself, so float32 keeps them to ~1e-7 nats a
            # position (the form sum p log p - sum p z + logsumexp z subtracts terms of
            # ~20 nats and needed float64, a cast that cost SmolLM2 2.2 s a forward at
            # 2048 positions of 49152 tokens). max(d) is taken out before the exp.
            part = logits[:, self.start::self.step].detach()
            self.p, self.z = [], []
            for i in range(0, part.shape[1], _CHUNK):
                z = part[:, i:i + _CHUNK].float()
                self.z.append(z.clone())
                p = torch.softmax(z.double(), dim=-1).float()
                # log sum p in float32 is ~1e-6, not 0: taken out, as the sum that
                # sum p e^d makes at d = 0
                self.p.append((p, torch.log(p.sum(-1))))
            return
        t = _first_tensor(ref)
        if t is None or not t.is_floating_point():
            raise TypeError(f"{type(model).__name__}'s output holds no floating-point tensor "
                            f"to compare (got {type(ref).__name__})")
        self.kind = "rel"
        self.ref = t.detach().double()
        self.ref_sq = float(self.ref.pow(2).sum()) or 1.0

    def __call__(self, out: Any) -> float:
        if self.kind == "kl":
            logits = out.logits[:, self.start::self.step]
            total = 0.0
            chunks = zip(range(0, logits.shape[1], _CHUNK), self.p, self.z, strict=True)
            for n, (p, log_norm), zr in chunks:
                d = logits[:, n:n + _CHUNK].float() - zr
                top = d.amax(dim=-1, keepdim=True)
                kl = (top.squeeze(-1) + torch.log((p * torch.exp(d - top)).sum(-1))
                      - log_norm - (p * d).sum(-1))
                total += float(kl.double().sum())
            return total / (logits.shape[0] * logits.shape[1])
        t = _first_tensor(out)
        return float((t.detach().double() - self.ref).pow(2).sum()) / self.ref_sq


def _block_of(model: nn.Module, site: str) -> tuple[nn.ModuleList, int] | None:
    """The outermost ``ModuleList`` entry whose module path holds ``site``."""
    parts = site.split(".")
    for i in range(1, len(parts)):
        if not parts[i].isdigit():
            continue
        try:
            mod = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return mod, int(parts[i])
    return None


class _Replay:
    """Record the stacks' block outputs in one forward, then run later forwards from a block."""

    def __init__(self, model: nn.Module, sites: list[str]) -> None:
        self.where: dict[str, tuple[nn.ModuleList, int]] = {}
        for site in sites:
            found = _block_of(model, site)
            if found is not None:
                self.where[site] = found
        self.outputs: dict[int, dict[int, Any]] = {}  # id(list) -> block index -> output
        self.order: dict[int, list[int]] = {}  # id(list) -> block indices in call order

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        lists = {id(lst): lst for lst, _ in self.where.values()}
        for key, lst in lists.items():
            self.outputs[key], self.order[key] = {}, []
            for j, block in enumerate(lst):
                def hook(mod, args, out, key=key, j=j):
                    self.order[key].append(j)
                    self.outputs[key][j] = _copied(out)
                handles.append(block.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for key in list(self.order):
            # replay holds only for a stack run in order, each block once: then a block's
            # inputs cannot depend on a later block
            if self.order[key] != list(range(len(lists[key]))):
                self.outputs.pop(key, None)
        self.where = {s: (lst, j) for s, (lst, j) in self.where.items() if id(lst) in self.outputs}

    def can(self, site: str) -> bool:
        return site in self.where

    @contextlib.contextmanager
    def from_block_of(self, site: str) -> Iterator[None]:
        """Blocks before ``site``'s return their recorded outputs instead of running."""
        if site not in self.where:
            yield
            return
        lst, start = self.where[site]
        saved = []
        for j in range(start):
            block = lst[j]
            saved.append((block, block.__dict__.get("forward")))
            out = self.outputs[id(lst)][j]
            block.forward = types.MethodType(lambda self, *a, _out=out, **k: _copied(_out), block)
        try:
            yield
        finally:
            for block, fwd in saved:
                if fwd is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = fwd


def _copied(out: Any) -> Any:
    """An output with fresh tensors, recorded and replayed: a block that changes its
    input in place must not change the recording."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


@contextlib.contextmanager
def site_budget(key: str, params: TileParams, budget: float) -> Iterator[None]:
    """Run the site with op key ``key`` at ``budget`` (its plan otherwise ``params``)."""
    before = _ops.site_plan(key)
    _ops.set_site_plans({key: dataclasses.replace(params, budget=float(budget), budget_reads=None)})
    try:
        yield
    finally:
        if before is None:
            _ops.drop_site_plans([key])
        else:
            _ops.set_site_plans({key: before})


def sweep(
    model: nn.Module,
    run: Callable[[], Any],
    sites: dict[str, tuple[str, TileParams]],
    candidates: dict[str, list[float]],
    *,
    progress: Callable[[], None] | None = None,
    positions_from: float = DISTANCE_FROM,
    positions_step: int = DISTANCE_STEP,
) -> Sweep:
    """Measure each site's end-to-end cost at each candidate budget.

    Args:
        model: the converted model (its block stacks are found by the sites' paths).
        run: one forward of ``model`` on the calibration tokens, returning its output.
        sites: site name -> (op site key, the plan it runs with uniformly).
        candidates: site name -> budgets to try it at (the uniform one is skipped:
            its cost is 0 by definition).
        progress: called once per forward.
        positions_from: the share of the output's positions the distance skips
            (0 where ``run`` already returns only the positions to compare, e.g.
            with a Hugging Face model's ``logits_to_keep``).
        positions_step: the distance reads every ``positions_step``-th position
            from there (1 where ``run`` returns only those).

    Returns:
        A `Sweep`; a candidate equal to the site's uniform budget costs 0.
    """
    t0 = time.perf_counter()
    tick = progress or (lambda: None)
    with torch.no_grad():
        with _ops.collecting(max_calls=0):  # every site exact: the original model
            distance = _Distance(model, run(), positions_from, positions_step)
        tick()
        replay = _Replay(model, list(sites))
        with replay.recording():
            base_out = run()
        base = distance(base_out)
        del base_out
        tick()
        result = Sweep(kind=distance.kind, base=base, forwards=2)
        checked = False
        # latest block first: the replay check then costs the least
        for site in sorted(sites, key=lambda s: -replay.where[s][1] if replay.can(s) else 0):
            key, params = sites[site]
            result.costs[site] = {}
            if replay.can(site) and not checked:
                # replay must give the uniform forward's output exactly, or it is not used
                with replay.from_block_of(site):
                    again = distance(run())
                result.forwards += 1
                checked = True
                if abs(again - base) > 1e-6 * max(1.0, abs(base)):
                    replay.where.clear()
                tick()
            for b in candidates[site]:
                if abs(b - params.budget) <= 1e-12:
                    result.costs[site][b] = 0.0
                    continue
                with site_budget(key, params, b), replay.from_block_of(site):
                    result.costs[site][b] = distance(run()) - base
                result.forwards += 1
                tick()
        result.replayed = bool(replay.where)
    result.seconds = time.perf_counter() - t0
    return result
