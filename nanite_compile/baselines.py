"""Training-free baselines at nanite's key budget, for the quality benchmark.

Each baseline is a rule that fills a level table (``kernels/levels.py``:
``EXACT`` = 0, ``POOL(r)`` = r, ``NONE`` = -1; ``[B, Hkv, mq, mk]`` int8) and
is computed by the reference operator,
:func:`nanite_compile.kernels.reference.tiled_attention_from_levels`, so the
baselines and nanite share one arithmetic and its tests:

* :class:`SlidingWindow`: each query tile sees itself (causal inside) and the
  ``w - 1`` tiles before it;
* :class:`SinksWindow` (StreamingLLM): the first ``sinks`` tiles plus a
  window of ``w`` tiles;
* :class:`BlockTopK` (Quest / MoBA-like): the query's own tile plus, per
  query tile, the ``k`` earlier tiles with the largest estimated attention
  mass (:func:`nanite_compile.density.tile_mass_estimate`: the tile's
  queries scored against the tile's mean key);
* :class:`PooledKV`: a near field of ``w`` exact tiles, every older tile seen
  as ``T / 2**r`` pooled summaries at one uniform level ``r``.

**The key budget** (the same count as nanite's ``levels._allowance`` and
``levels.level_reads``). A query in query tile ``j`` *reads* ``T`` keys for
every EXACT tile of row ``j`` (the diagonal tile counts whole, as the
operator gathers it whole and masks the future keys), ``T >> r`` for every
POOL(r) tile and ``F`` once if the row has STATE tiles (no baseline here uses
the state). The causal original reads ``T (j + 1)``: every tile up to its own
exact. A rule runs at budget ``beta`` when the total over all queries,
``sum_j n_j reads_j`` (``n_j`` = real queries of tile ``j``), is at most
``beta * sum_j n_j T (j + 1)``, with ``beta = 1`` giving exact attention. Each
rule picks its integer parameter as the largest (finest) that fits, so it
spends at most the budget; :func:`key_reads` gives the realised totals, which
the benchmark reports for every method. Nanite's rule counts the same way but
may overspend when its mandatory part (near field, anchors) alone exceeds
the budget; so does a baseline whose smallest setting (the diagonal tile
alone) does.

Using a baseline with a Hugging Face model needs no compiler:
:func:`use_baseline` registers one attention function with transformers'
``AttentionInterface`` (its documented extension point) and switches the
model to it for the duration of a ``with`` block::

    with use_baseline(model, SlidingWindow(), budget=0.25) as records:
        logits = model(ids).logits
    ratio = sum(r["reads"] for r in records) / sum(r["original_reads"] for r in records)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .density import tile_mass_estimate
from .kernels.levels import EXACT, NONE, level_reads
from .kernels.reference import tiled_attention_from_levels

__all__ = [
    "BASELINES",
    "BlockTopK",
    "PooledKV",
    "SinksWindow",
    "SlidingWindow",
    "baseline_attention",
    "key_reads",
    "use_baseline",
]

ATTN_IMPLEMENTATION = "nanite_baseline"


def _tiles(nq: int, nk: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query tile indices ``[mq]``, real queries per query tile ``[mq]``, and ``mk``.

    Queries are the last ``nq`` of ``nk`` positions (as in the operator).
    """
    mk = -(-nk // tile)
    q0 = nk - nq
    jq0 = q0 // tile
    q_tiles = torch.arange(jq0, mk, device=device)
    start = torch.clamp(q_tiles * tile, min=q0)
    end = torch.clamp((q_tiles + 1) * tile, max=nk)
    return q_tiles, (end - start).to(torch.float64), mk


def _row_fits(cost: torch.Tensor, orig: torch.Tensor, n: torch.Tensor, budget: float) -> bool:
    """Whether per-row reads ``cost`` spend at most ``budget`` of ``orig`` over all queries."""
    return float((cost * n).sum()) <= budget * float((orig * n).sum()) * (1 + 1e-12)


def key_reads(levels: torch.Tensor, tile: int, nq: int, nk: int, state_features: int = 0):
    """Total key reads over all queries of a level table, and the causal original's.

    Args:
        levels: ``[B, Hkv, mq, mk]`` (or ``[Hkv, mq, mk]``) level table.
        tile: ``T``.
        nq, nk: queries (the last ``nq`` positions) and keys.
        state_features: ``F``, charged once per row with STATE tiles.

    Returns:
        ``(reads, original)`` floats summed over batch, KV heads and queries;
        ``original`` is the causal original's ``T (j + 1)`` per query of tile
        ``j`` (whatever the table leaves out). Divide by ``B * Hkv * nq`` for
        per-query numbers.
    """
    if levels.dim() == 3:
        levels = levels[None]
    q_tiles, n, _ = _tiles(nq, nk, tile, levels.device)
    reads = level_reads(levels, tile, state_features)  # [B, Hkv, mq]
    orig = (q_tiles + 1).to(torch.float64) * tile
    copies = levels.shape[0] * levels.shape[1]
    return float((reads * n).sum()), copies * float((orig * n).sum())


@dataclass(frozen=True)
class _Baseline:
    """A rule that fills a level table within a key budget (see the module docstring)."""

    tile: int = 64
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.tile < 2 or self.tile & (self.tile - 1):
            raise ValueError(f"tile must be a power of two >= 2, got {self.tile}")

    def levels(self, q: torch.Tensor, k: torch.Tensor, *, budget: float, scale: float) -> torch.Tensor:
        """The level table for queries ``q`` ``[B, H, Nq, D]`` over keys ``k`` ``[B, Hkv, Nk, D]``.

        Returns:
            ``[B, Hkv, mq, mk]`` int8, causal (``NONE`` above the diagonal).
        """
        if not (0.0 < budget <= 1.0):
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        b, hkv, nk = k.shape[0], k.shape[1], k.shape[2]
        q_tiles, n, mk = _tiles(q.shape[2], nk, self.tile, k.device)
        dist = q_tiles[:, None] - torch.arange(mk, device=k.device)[None, :]  # [mq, mk]
        lv = self._fill(q, k, dist, n, budget, scale)
        return lv.expand(b, hkv, -1, -1).contiguous()

    def _fill(self, q, k, dist, n, budget, scale) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _table(self, exact: torch.Tensor, dist: torch.Tensor, pool: int | None = None) -> torch.Tensor:
        lv = torch.full(exact.shape, NONE, dtype=torch.int8, device=exact.device)
        if pool is not None:
            lv = torch.where(dist >= 0, torch.tensor(pool, dtype=torch.int8, device=lv.device), lv)
        return torch.where(exact & (dist >= 0), torch.tensor(EXACT, dtype=torch.int8, device=lv.device), lv)

    def _largest(self, cost: Callable[[int], torch.Tensor], lo: int, hi: int,
                 orig: torch.Tensor, n: torch.Tensor, budget: float) -> int:
        """The largest ``p`` in ``lo..hi`` whose row costs fit (``lo`` if none does); cost grows with ``p``."""
        if _row_fits(cost(hi), orig, n, budget):
            return hi
        a, b = lo, hi  # cost(a) fits or a == lo; cost(b) does not
        while b - a > 1:
            mid = (a + b) // 2
            if _row_fits(cost(mid), orig, n, budget):
                a = mid
            else:
                b = mid
        return a


def _orig(dist: torch.Tensor, tile: int) -> torch.Tensor:
    return (dist >= 0).sum(-1).to(torch.float64) * tile  # [mq]


@dataclass(frozen=True)
class SlidingWindow(_Baseline):
    """The query's own tile and the ``w - 1`` tiles before it, exact; ``w`` the largest that fits.

    Equals SDPA with the block band mask: key ``s`` visible to query ``t``
    iff ``s <= t`` and ``s // T > t // T - w``.
    """

    name: ClassVar[str] = "sliding"

    def window(self, dist: torch.Tensor, n: torch.Tensor, budget: float) -> int:
        orig = _orig(dist, self.tile)
        vis = dist >= 0

        def cost(w: int) -> torch.Tensor:
            return (vis & (dist < w)).sum(-1).to(torch.float64) * self.tile

        return self._largest(cost, 1, dist.shape[-1], orig, n, budget)

    def _fill(self, q, k, dist, n, budget, scale):
        w = self.window(dist, n, budget)
        return self._table(dist < w, dist)


@dataclass(frozen=True)
class SinksWindow(_Baseline):
    """StreamingLLM: the first ``sinks`` tiles plus a window of ``w`` tiles, exact."""

    sinks: int = 1
    name: ClassVar[str] = "sinks"

    def window(self, dist: torch.Tensor, n: torch.Tensor, budget: float) -> int:
        orig = _orig(dist, self.tile)
        vis = dist >= 0
        sink = torch.arange(dist.shape[-1], device=dist.device)[None, :] < self.sinks

        def cost(w: int) -> torch.Tensor:
            return (vis & ((dist < w) | sink)).sum(-1).to(torch.float64) * self.tile

        return self._largest(cost, 1, dist.shape[-1], orig, n, budget)

    def _fill(self, q, k, dist, n, budget, scale):
        w = self.window(dist, n, budget)
        sink = torch.arange(dist.shape[-1], device=dist.device)[None, :] < self.sinks
        return self._table((dist < w) | sink, dist)


@dataclass(frozen=True)
class BlockTopK(_Baseline):
    """The own tile plus the ``k`` earlier tiles with the largest estimated mass, per query tile.

    The score of key tile ``i`` for query tile ``j`` is
    :func:`~nanite_compile.density.tile_mass_estimate` (each query against
    the tile's mean key, softmax over tiles, mean over the tile's queries and
    the KV head's query heads), so the choice differs by KV head. ``k`` is the
    largest that fits; the cost is that of a sliding window of ``k + 1``.
    """

    name: ClassVar[str] = "topk"

    def count(self, dist: torch.Tensor, n: torch.Tensor, budget: float) -> int:
        orig = _orig(dist, self.tile)
        vis = dist >= 0

        def cost(kk: int) -> torch.Tensor:
            return (vis & (dist < kk + 1)).sum(-1).to(torch.float64) * self.tile

        return self._largest(cost, 0, dist.shape[-1] - 1, orig, n, budget)

    def _fill(self, q, k, dist, n, budget, scale):
        kk = self.count(dist, n, budget)
        nq, nk = q.shape[2], k.shape[2]
        if nq != nk:
            raise ValueError("BlockTopK scores full prefill only (Nq == Nk)")
        score = tile_mass_estimate(q, k, self.tile, scale)  # [B, Hkv, mq, mk]
        cand = dist >= 1
        score = score.masked_fill(~cand, -math.inf)
        rank = score.argsort(-1, descending=True).argsort(-1)  # 0 = best
        chosen = cand & (rank < kk)
        return self._table(chosen | (dist == 0), dist)


@dataclass(frozen=True)
class PooledKV(_Baseline):
    """A near field of ``w`` exact tiles; every older tile as ``T / 2**r`` summaries at one level ``r``.

    ``r`` is the finest level at which a near field of one tile fits the
    budget, then ``w`` the largest that fits at that ``r``. At budget 1 it is
    ``r = 0``: every tile exact.
    """

    name: ClassVar[str] = "pooled"

    def plan(self, dist: torch.Tensor, n: torch.Tensor, budget: float) -> tuple[int, int]:
        orig = _orig(dist, self.tile)
        vis = dist >= 0
        T = self.tile
        top = int(math.log2(T))

        def cost_at(r: int) -> Callable[[int], torch.Tensor]:
            def cost(w: int) -> torch.Tensor:
                near = (vis & (dist < w)).sum(-1).to(torch.float64)
                far = (vis & (dist >= w)).sum(-1).to(torch.float64)
                return near * T + far * (T >> r)
            return cost

        r = next((r for r in range(top + 1) if _row_fits(cost_at(r)(1), orig, n, budget)), top)
        w = self._largest(cost_at(r), 1, dist.shape[-1], orig, n, budget)
        return r, w

    def _fill(self, q, k, dist, n, budget, scale):
        r, w = self.plan(dist, n, budget)
        return self._table(dist < w, dist, pool=r)


BASELINES: dict[str, type[_Baseline]] = {
    c.name: c for c in (SlidingWindow, SinksWindow, BlockTopK, PooledKV)
}


def baseline_attention(
    method: _Baseline,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    budget: float,
    scale: float | None = None,
    records: list | None = None,
) -> torch.Tensor:
    """Causal attention under a baseline's level table, by the reference operator.

    Args:
        method: a baseline, e.g. ``SlidingWindow(tile=64)``.
        q: ``[B, H, Nq, D]``, the last ``Nq`` positions; k, v: ``[B, Hkv, Nk, D]``.
        budget: share of the causal original's key reads, in ``(0, 1]``.
        scale: softmax scale (default ``D ** -0.5``).
        records: if a list, one dict per call is appended: ``reads`` and
            ``original_reads`` (totals, :func:`key_reads`), ``queries``
            (``B * Hkv * Nq``) and the rule's parameters.

    Returns:
        ``[B, H, Nq, Dv]`` in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    levels = method.levels(q, k, budget=budget, scale=scale)
    out = tiled_attention_from_levels(q, k, v, levels, scale=scale, causal=True, tile=method.tile)
    if records is not None:
        reads, orig = key_reads(levels, method.tile, q.shape[2], k.shape[2])
        records.append({"method": method.name, "budget": budget, "reads": reads,
                        "original_reads": orig, "queries": k.shape[0] * k.shape[1] * q.shape[2]})
    return out


# the baseline the registered attention function runs, set by use_baseline
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("nanite_baseline", default=None)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function (``AttentionInterface``) running the active baseline."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} runs only inside "
            "nanite_compile.baselines.use_baseline(model, method, budget)"
        )
    method, budget, records = active
    if attention_mask is not None:
        raise ValueError("baselines support causal attention without a mask (no padding)")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"baselines are causal; {type(module).__name__} is not")
    if dropout and module.training:
        raise ValueError("baselines do not implement attention dropout")
    out = baseline_attention(method, query, key, value, budget=budget, scale=scaling,
                             records=records)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def use_baseline(model, method: _Baseline, budget: float) -> Iterator[list]:
    """Run a Hugging Face model's attention as ``method`` at ``budget`` inside the block.

    Registers :data:`ATTN_IMPLEMENTATION` with ``transformers.AttentionInterface``
    (once; registering is idempotent) and switches the model to it with
    ``set_attn_implementation``; the previous implementation is restored on
    exit. transformers builds no mask for an implementation it does not know,
    so the function sees ``attention_mask=None`` and applies causality itself;
    padded batches are refused.

    Yields:
        A list that receives one record per attention call (see
        :func:`baseline_attention`).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)
    records: list = []
    previous = model.config._attn_implementation
    token = _ACTIVE.set((method, float(budget), records))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield records
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
