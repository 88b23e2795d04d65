"""Generation with a cache bounded by the plan: `NaniteCache` and `generate`.

A converted Hugging Face model generates with Hugging Face's full KV cache by
default (the tiled op then gets every past key at each decode step). Passing
a `NaniteCache` instead keeps per layer only what the plan reads:

* **exact** tokens: the anchor tiles (the first ``a``) and the near field (the
  query's own tile and the ``w - 1`` before it), as Hugging Face caches them
  (post-RoPE keys, values);
* **pooled** tiles: a tile that leaves the near field is kept as summaries
  (mean key, mean value, count of valid tokens) at a level that depends only
  on its age ``d`` (distance in tiles from the newest tile); as it ages it
  moves down the levels (pairs of summaries merge: means of means weighted by
  counts are exact means, and the finer data is dropped);
* **state**: tiles older than the horizon are folded into ``S = sum phi(k) v^T``,
  ``z = sum phi(k)`` with the op's positive random features (same seed), so
  the cache's size grows with the horizon, not with the context.

**The schedule** (`make_schedule`). From the site's plan (tile ``T``, near
field ``w``, anchors ``a``, horizon, budget, state width ``F``) and a
reference context ``N`` (the ``context`` argument: by default the model's
``max_position_embeddings``), the per-query read allowance is
``R = budget * N`` (or ``budget_reads``). Anchors and near field take
``(a + w) T``; the *band* of pooled tiles holds the ``H`` middle tiles of a
query at ``N`` (all of them while one summary per tile fits in the rest,
otherwise the nearest ``floor(rest - F)``, the older ones going to the state),
capped by the plan's horizon. Each band age ``d = w .. w + H - 1`` gets the
level ``ceil(log2(T / clamp(lam / d, 1, T)))``: wanted reads fall off as
``1 / d``, as in the run-time rule with uniform density, with ``lam`` the
largest whose reads fit the allowance. So at context ``N`` a query reads at
most ``R`` keys (anchors + near field + summaries, + ``F`` once the state is
in use), and beyond ``N`` the reads and the cache stay constant.

**Folding in blocks.** The state is a sum over raw tokens, but a tile in the
band keeps only summaries. So each tile's contribution ``phi(K_i)^T V_i`` is
added, when it leaves the near field (raw keys at hand), to the accumulator
of its *block* (``g = ceil(H / 4)`` consecutive tiles after the anchors); a
block folds into the state when its newest tile passes age ``w + H``, and
its tiles leave the band then (tiles waiting for their block sit at the
coarsest level). The cache thus holds at most ``H / g + 2`` block
accumulators of ``F (D + 1)`` numbers per KV head instead of one per tile.

`static_levels` is the level table this defines for a whole sequence
(``[mq, mk]``, a function of the tile indices only); decoding token by token
with a `NaniteCache` gives, for the last query of every step, the output of
``reference.tiled_attention_from_levels`` on the whole sequence with that
table (tests/test_generation.py checks it).

**Wiring.** The attention module calls ``cache.update(k, v, layer_idx)`` and
then ``torch.ops.nanite.tiled_attention(q, k, v, mask, ...)``.
``NaniteCache.update`` is one registered op, ``nanite::cache_update``, so
Dynamo traces the captured attention through it without a graph break (a
break makes Dynamo share the resume frame among the layers' captures, and
past its recompile limit, 8, the later layers would run uncompiled, i.e. the
original attention on compressed keys). The op's real implementation updates
the cache the model call is running with (the model's forward hooks make it
the active one); its fake returns the prompt's shape for a prompt and, for
one token, the compressed length the layer announced beforehand as the shape
of a data-less ``[0, Nc]`` tensor (``next_shape``), so no shape depends on
data. For one new token it returns the layer's compressed keys and values
``[anchors | summaries | near field]`` and registers their counts and state
with ``kernels/decode.py``; the tiled op finds them from the key tensor it
receives (or a GQA head-repeated copy of it) and runs the one-query formula.
The Hugging Face mask covers only the new token (`NaniteCache.get_mask_sizes`
returns ``(1, seen)``): it is all-True in generation, so Hugging Face passes
none, whatever each layer's compressed length, and the cache keeps its own
key validity, taken from the ``attention_mask`` the model is called with (left
padding works; summaries count valid tokens only). ``get_seq_length`` stays
the number of tokens seen, so positions and RoPE are right. A prompt
(``Nq > 1``) on an empty cache runs the op's normal path on the whole prompt,
then the compressed cache is built from the prompt's keys and values; more
than one token after that (assisted or chunked decoding) is refused.

At budget 1.0 (no ``budget_reads``) the schedule keeps every tile exact and
the cache behaves as Hugging Face's ``DynamicCache`` (full keys and values,
the op's exact path); greedy tokens equal the original model's. A converted
model's plain ``generate()`` (no cache passed) keeps using ``DynamicCache``:
the bounded cache is opt-in, because below budget 1.0 it changes the
attention of decode steps (they read the pooled past, as a prefill would).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .evaluate import cache_kwarg
from .kernels import ops as _ops  # noqa: F401  (registers torch.ops.nanite.*)
from .kernels.decode import CompressedKV, register
from .kernels.levels import EXACT, NONE, STATE, TileParams
from .kernels.masks import MaskStructure
from .kernels.reference import random_features, state_tiles

try:  # transformers is optional (the "hf" extra)
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - exercised only without transformers
    Cache = object  # type: ignore[assignment,misc]
    CacheLayerMixin = object  # type: ignore[assignment,misc]

__all__ = [
    "DecodeSchedule",
    "NaniteCache",
    "generate",
    "make_schedule",
    "static_levels",
]


# ------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class DecodeSchedule:
    """The age-based level rule of a bounded cache (plain data).

    Attributes:
        tile: ``T``.
        window: near field ``w`` in tiles, the newest tile included.
        anchors: ``a`` leading tiles kept exact.
        band: level of a pooled tile at age ``w + i`` for ``i < len(band)``
            (nondecreasing; 0 is EXACT); ``H = len(band)`` is the horizon.
        fold_block: ``g``, tiles per state accumulator.
        state_features: ``F`` (0: no state; tiles past the band stay at the
            coarsest level, so the cache then grows by one summary per tile).
        exact: keep everything exact (budget 1.0): the full cache.
    """

    tile: int
    window: int
    anchors: int
    band: tuple[int, ...]
    fold_block: int
    state_features: int
    exact: bool = False

    @property
    def horizon(self) -> int:
        return len(self.band)

    @property
    def max_pool(self) -> int:
        return int(math.log2(self.tile))

    def folded(self, i: int, j: int) -> bool:
        """Whether key tile ``i`` is in the state of query tile ``j``."""
        if self.exact or self.state_features <= 0 or i < self.anchors:
            return False
        g = self.fold_block
        last = self.anchors + ((i - self.anchors) // g + 1) * g - 1
        return j - last >= self.window + self.horizon

    def level(self, i: int, j: int) -> int:
        """Level of key tile ``i`` for query tile ``j`` (EXACT, POOL r, STATE or NONE)."""
        if i > j:
            return NONE
        d = j - i
        if self.exact or d < self.window or i < self.anchors:
            return EXACT
        if self.folded(i, j):
            return STATE
        k = d - self.window
        return self.band[k] if k < self.horizon else self.max_pool

    def compressed_length(self, n_tokens: int) -> int:
        """Entries the cache holds after ``n_tokens`` tokens (anchors + summaries + near field)."""
        if n_tokens <= 0:
            return 0
        if self.exact:
            return n_tokens
        T = self.tile
        j = (n_tokens - 1) // T
        near0 = max(0, j - self.window + 1)
        total = n_tokens - near0 * T + min(self.anchors, near0) * T
        for i in range(near0 - 1, self.anchors - 1, -1):
            if self.folded(i, j):
                break  # older tiles fold first
            total += T >> self.level(i, j)
        return total


def make_schedule(params: TileParams, context: int) -> DecodeSchedule:
    """The schedule of a site's plan at reference context ``context`` (see the module doc).

    Args:
        params: the site's tile parameters.
        context: tokens at which a fraction budget is turned into reads per query.

    Raises:
        ValueError: ``context`` is not a positive int.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    T, w, a, F = params.tile, params.window, params.anchors, params.state_features
    R = int(math.log2(T))
    if params.budget_reads is None and params.budget >= 1.0:
        return DecodeSchedule(T, w, a, (), 1, F, exact=True)
    allow = float(params.budget_reads) if params.budget_reads is not None else params.budget * context
    m = -(-context // T)
    n_mid = max(0, m - w - a)  # middle tiles of the last query at `context`
    rest = allow - (w + a) * T
    if F > 0 and rest < n_mid and n_mid > F:
        H = int(max(0.0, math.floor(rest - F)))  # the older tiles go to the state
        band_reads = rest - F
    else:
        H, band_reads = n_mid, rest
    if params.horizon is not None:
        H = min(H, params.horizon)
    g = max(1, -(-H // 4)) if F > 0 else 1
    if F > 0 and H < n_mid:
        band_reads -= g - 1  # tiles waiting for their block to fold, at one summary each
    ages = [w + k for k in range(H)]

    def levels_for(loglam: float) -> list[int]:
        out = []
        for d in ages:
            want = min(float(T), max(1.0, math.exp(loglam) / d))
            out.append(int(min(R, max(0, math.ceil(math.log2(T / want) - 1e-9)))))
        return out

    lo, hi = -60.0, 60.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sum(T >> lv for lv in levels_for(mid)) <= band_reads:
            lo = mid
        else:
            hi = mid
    band = tuple(levels_for(lo))
    return DecodeSchedule(T, w, a, band, g, F)


def static_levels(schedule: DecodeSchedule, n_tokens: int, n_query: int | None = None) -> torch.Tensor:
    """The level table the schedule defines for a whole sequence.

    Args:
        schedule: the cache's schedule.
        n_tokens: sequence length ``N``.
        n_query: the queries are the last ``n_query`` tokens (default ``N``).

    Returns:
        ``[mq, mk]`` int8 (expand to ``[B, Hkv, mq, mk]`` for
        ``reference.tiled_attention_from_levels``), ``mk = ceil(N / T)``, query
        tiles from ``(N - n_query) // T``.
    """
    n_query = n_tokens if n_query is None else n_query
    T = schedule.tile
    mk = -(-n_tokens // T)
    jq0 = (n_tokens - n_query) // T
    rows = [[schedule.level(i, j) for i in range(mk)] for j in range(jq0, mk)]
    return torch.tensor(rows, dtype=torch.int8)


# ------------------------------------------------------------------ state pieces


def _merge(acc, part):
    """Sum of two ``(S, z, c)`` on a common shift."""
    if acc is None:
        return part
    s1, z1, c1 = acc
    s2, z2, c2 = part
    c = torch.maximum(c1, c2)
    a1, a2 = torch.exp(c1 - c), torch.exp(c2 - c)
    return (s1 * a1[..., None, None] + s2 * a2[..., None, None],
            z1 * a1[..., None] + z2 * a2[..., None], c)


def _merge_many(parts, idx: list[int]):
    """`_merge` of the tiles ``idx`` of per-tile ``(S, z, c)`` (``[B, Hkv, m, ...]``) at once."""
    s, z, c = parts
    sel = torch.tensor(idx, device=c.device)
    s, z, c = s.index_select(2, sel), z.index_select(2, sel), c.index_select(2, sel)
    top = c.amax(2)  # [B, Hkv]
    a = torch.exp(c - top[..., None])
    return (s * a[..., None, None]).sum(2), (z * a[..., None]).sum(2), top


def _pool(k, v, cnt, factor):
    """Merge groups of ``factor`` consecutive entries: count-weighted means, counts added."""
    if factor == 1:
        return k, v, cnt
    b, h, n, d = k.shape
    dv = v.shape[-1]
    w = cnt.to(k.dtype)[:, None, :, None]
    ks = (k * w).reshape(b, h, n // factor, factor, d).sum(3)
    vs = (v * w).reshape(b, h, n // factor, factor, dv).sum(3)
    c = cnt.reshape(b, n // factor, factor).sum(-1)
    den = c.clamp_min(1.0).to(k.dtype)[:, None, :, None]
    return ks / den, vs / den, c


def _pool_runs(k, v, cnt, runs):
    """`_pool` of the entries ``runs = [(first, length, factor), ...]`` (in order) of ``k,
    v [B, Hkv, N, D]``, ``cnt [B, N]``: neighbouring runs with one factor are pooled by one
    call (a prompt's or an aging cache's tiles, not one call a tile)."""
    merged: list[list[int]] = []
    for first, length, factor in runs:
        if merged and merged[-1][0] + merged[-1][1] == first and merged[-1][2] == factor:
            merged[-1][1] += length
        else:
            merged.append([first, length, factor])
    return [_pool(k[:, :, a:a + n], v[:, :, a:a + n], cnt[:, a:a + n], f) for a, n, f in merged]


# ------------------------------------------------------------------ the cache


class NaniteLayer(CacheLayerMixin):
    """One layer's bounded cache (see the module doc). Tensors ``[B, Hkv, N, D]``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, schedule: DecodeSchedule, *, seed: int, scale: float | None,
                 register_exact: bool = False) -> None:
        super().__init__()
        self.schedule = schedule
        self.seed = seed
        self.scale = scale
        self.register_exact = register_exact  # an exact layer of a bounded cache registers too
        self.seen = 0
        self.count: torch.Tensor | None = None  # [B, Nc]
        self.n_anchor = 0  # anchor tokens at the front
        self.band_tiles: list[tuple[int, int]] = []  # (tile, level), oldest first
        self.near0 = 0  # first tile of the near field
        self.state = None  # (S, z, c) of the folded tiles
        self.pending: dict[int, tuple] = {}  # block -> (S, z, c) of its tiles out of the near field
        self.proj: torch.Tensor | None = None
        self.entry: CompressedKV | None = None
        # [0, Nc]: the entries after one more token, for the trace of cache_update
        self.next_shape = torch.empty(0, 2, dtype=torch.uint8)  # (not 1: Dynamo specialises 1)

    # -- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the full-cache sizes; NaniteCache.get_mask_sizes decides for a bounded cache
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.__init__(self.schedule, seed=self.seed, scale=self.scale,
                      register_exact=self.register_exact)

    def _batch_apply(self, fn) -> None:
        if self.keys is None:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.count is not None:
            self.count = fn(self.count)
        if self.state is not None:
            self.state = tuple(fn(t) for t in self.state)
        self.pending = {b: tuple(fn(t) for t in acc) for b, acc in self.pending.items()}
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a NaniteCache cannot be cropped: pooled tiles cannot be un-pooled")

    # -- the bounded cache
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor):
        """Add ``n`` tokens; return what the op should attend to (see `_update`)."""
        out = self._update(key_states, value_states, valid)
        self.next_shape = torch.empty(0, self.schedule.compressed_length(self.seen + 1),
                                      dtype=torch.uint8, device=key_states.device)
        return out

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor):
        """Add ``n`` tokens; return what the op should attend to.

        Returns the full keys/values for a prompt (the op's normal path runs on
        it) and the compressed ones, registered for the op, for one new token.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if self.schedule.exact:
            self.keys = key_states if self.keys is None else torch.cat([self.keys, key_states], 2)
            self.values = value_states if self.values is None else torch.cat([self.values, value_states], 2)
            if self.register_exact:
                cnt = valid.to(torch.float32)
                self.count = cnt if self.count is None else torch.cat([self.count, cnt], 1)
            self.seen += n
            self._publish()
            return self.keys, self.values
        if self.scale is None:
            self.scale = key_states.shape[-1] ** -0.5
        if self.seen == 0:
            self._build(key_states, value_states, valid)
            self._publish()
            return (key_states, value_states) if n > 1 else (self.keys, self.values)
        if n != 1:
            raise NotImplementedError(
                f"NaniteCache takes the prompt once and then one token per step; got {n} new tokens "
                f"after {self.seen} (assisted or chunked decoding needs the full cache: generate "
                "without past_key_values=NaniteCache(...))"
            )
        if self.seen % self.schedule.tile == 0:
            self._age(self.seen // self.schedule.tile)
        cnt = valid.to(self.count.dtype)
        self.keys = torch.cat([self.keys, key_states], 2)
        self.values = torch.cat([self.values, value_states], 2)
        self.count = torch.cat([self.count, cnt], 1)
        self.seen += 1
        self._publish()
        return self.keys, self.values

    def _proj(self, k: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            self.proj = random_features(k.shape[-1], self.schedule.state_features, k.shape[1],
                                        self.seed, k.device, torch.float32 if k.dtype != torch.float64
                                        else torch.float64)
        return self.proj

    def _state_part(self, k, v, valid):
        """``(S, z, c)`` of one tile's tokens ``k, v [B, Hkv, T, D]``."""
        return tuple(x.squeeze(2) for x in self._tile_states(k, v, valid))

    def _block(self, i: int) -> int:
        return (i - self.schedule.anchors) // self.schedule.fold_block

    def _build(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """The compressed cache of a prompt ``k, v [B, Hkv, N, D]``.

        Every tile between the anchors and the near field at once: their states in one
        pass (`_tile_states`), summed into the state or their block's accumulator, and
        their summaries pooled one run of equal level at a time (levels only grow with
        age), not one tile at a time (at 8192 tokens and tile 32 that was 250 tiles of
        small ops per layer, about 190 ms).
        """
        sc = self.schedule
        T, a = sc.tile, sc.anchors
        n = k.shape[2]
        j = (n - 1) // T
        near0 = max(0, j - sc.window + 1)
        n_anchor = min(a, near0) * T
        cnt = valid.to(torch.float32)
        ks, vs, cs = [k[:, :, :n_anchor]], [v[:, :, :n_anchor]], [cnt[:, :n_anchor]]
        tiles = list(range(a, near0))
        folded = [sc.folded(i, j) for i in tiles]
        if sc.state_features > 0 and tiles:
            sl = slice(a * T, near0 * T)
            parts = self._tile_states(k[:, :, sl], v[:, :, sl], valid[:, sl])  # per tile
            groups: dict[int | None, list[int]] = {}  # None: the state; else a block
            for t, (i, f) in enumerate(zip(tiles, folded, strict=True)):
                groups.setdefault(None if f else self._block(i), []).append(t)
            for key, idx in groups.items():
                part = _merge_many(parts, idx)
                if key is None:
                    self.state = _merge(self.state, part)
                else:
                    self.pending[key] = _merge(self.pending.get(key), part)
        band = [(i, sc.level(i, j)) for i, f in zip(tiles, folded, strict=True) if not f]
        for pk, pv, pc in _pool_runs(k, v, cnt, [(i * T, T, 1 << lv) for i, lv in band]):
            ks.append(pk)
            vs.append(pv)
            cs.append(pc)
        ks.append(k[:, :, near0 * T:])
        vs.append(v[:, :, near0 * T:])
        cs.append(cnt[:, near0 * T:])
        self.keys, self.values, self.count = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(cs, 1)
        self.n_anchor, self.band_tiles, self.near0, self.seen = n_anchor, band, near0, n
        self._check()

    def _tile_states(self, k, v, valid):
        """``(S, z, c)`` of every tile of ``k, v [B, Hkv, m*T, D]`` (``valid [B, m*T]``):
        the op's `state_tiles` (``S [B, Hkv, m, F, Dv]``, ``z [B, Hkv, m, F]``, one shift
        for all of them), the shift repeated per tile ``c [B, Hkv, m]``."""
        cd = self._proj(k).dtype
        s, z, c = state_tiles(k.to(cd), v.to(cd), valid, self.proj, self.scale,
                              self.schedule.tile)
        return s, z, c[..., None].expand(-1, -1, s.shape[2])

    def _age(self, j: int) -> None:
        """Tile ``j`` starts: the tile leaving the near field enters the band, every band tile
        moves to its level at the new age, full blocks past the horizon fold into the state."""
        sc = self.schedule
        T = sc.tile
        leaving = j - sc.window
        head = self.n_anchor
        off = head
        ks, vs, cs = [self.keys[:, :, :head]], [self.values[:, :, :head]], [self.count[:, :head]]
        band, runs = [], []  # runs: (first entry, entries, pooling factor) of kept tiles
        for i, lv in self.band_tiles:
            ln = T >> lv
            if sc.folded(i, j):
                b = self._block(i)
                if b in self.pending:
                    self.state = _merge(self.state, self.pending.pop(b))
            else:
                new = sc.level(i, j)
                band.append((i, new))
                runs.append((off, ln, 1 << (new - lv)))
            off += ln
        for pk, pv, pc in _pool_runs(self.keys, self.values, self.count, runs):
            ks.append(pk)
            vs.append(pv)
            cs.append(pc)
        near_k, near_v, near_c = self.keys[:, :, off:], self.values[:, :, off:], self.count[:, off:]
        if leaving >= 0:
            tk, tv, tc = near_k[:, :, :T], near_v[:, :, :T], near_c[:, :T]
            near_k, near_v, near_c = near_k[:, :, T:], near_v[:, :, T:], near_c[:, T:]
            if leaving < sc.anchors:
                ks[0] = torch.cat([ks[0], tk], 2)
                vs[0] = torch.cat([vs[0], tv], 2)
                cs[0] = torch.cat([cs[0], tc], 1)
                self.n_anchor += T
            else:
                if sc.state_features > 0:
                    part = self._state_part(tk, tv, tc > 0)
                    if sc.folded(leaving, j):
                        self.state = _merge(self.state, part)
                    else:
                        b = self._block(leaving)
                        self.pending[b] = _merge(self.pending.get(b), part)
                if not sc.folded(leaving, j):
                    lv = sc.level(leaving, j)
                    pk, pv, pc = _pool(tk, tv, tc, 1 << lv)
                    ks.append(pk)
                    vs.append(pv)
                    cs.append(pc)
                    band.append((leaving, lv))
            self.near0 = leaving + 1
        ks.append(near_k)
        vs.append(near_v)
        cs.append(near_c)
        self.keys, self.values, self.count = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(cs, 1)
        self.band_tiles = band

    def _check(self) -> None:
        want = self.schedule.compressed_length(self.seen)
        if self.keys.shape[2] != want:  # an internal invariant, cheap to keep checked
            raise RuntimeError(f"NaniteCache layout holds {self.keys.shape[2]} entries, schedule says {want}")

    def _publish(self) -> None:
        if (self.schedule.exact and not self.register_exact) or self.keys is None:
            return
        s = self.state
        self.entry = CompressedKV(
            keys=self.keys, values=self.values, count=self.count,
            state_s=None if s is None else s[0], state_z=None if s is None else s[1],
            state_c=None if s is None else s[2], feature_proj=self.proj, scale=self.scale,
        )
        register(self.entry)

    def nbytes(self) -> int:
        """Bytes held: entries, counts, state and block accumulators."""
        ts = [self.keys, self.values, self.count]
        if self.state is not None:
            ts += list(self.state)
        for acc in self.pending.values():
            ts += list(acc)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _layer_plans(model: nn.Module, n_layers: int) -> tuple[Any, dict[int, TileParams]]:
    """The converted model's state and the tile parameters of each decoder layer."""
    state = model.__dict__.get("_nanite_state")
    if state is None:
        raise ValueError(
            f"{type(model).__name__} was not converted: NaniteCache needs the model returned by "
            "nanite_compile.convert(model)"
        )
    sites = [s for be in state.backends.values() for s in be.sites]
    rewritten = [s for s in sites if s.status == "rewritten"]
    if not rewritten:
        raise ValueError("no attention site of this model was rewritten: nothing to bound "
                         "(see nanite_compile.report(model))")
    fields = ("tile", "window", "anchors", "horizon", "budget", "budget_reads", "state_features")
    by_layer: dict[int, TileParams] = {}
    for s in rewritten:
        params = TileParams(**{f: s.plan[f] for f in fields})
        idx = _layer_index(model, s.module_path)
        if idx is None:
            raise ValueError(f"cannot tell which decoder layer attention site {s.site} belongs to "
                             "(no layer_idx on its module)")
        by_layer[idx] = params
    missing = [i for i in range(n_layers) if i not in by_layer]
    skipped = [s.site for s in sites if s.status != "rewritten"]
    bounded = any(not _is_exact(p) for p in by_layer.values())
    if bounded and (skipped or missing):
        raise ValueError(
            f"attention site(s) {(skipped or missing)[:3]} stay exact and would see only the "
            "compressed cache; generate with the full cache (no NaniteCache) or at budget 1.0"
        )
    if not bounded:  # budget 1.0: every layer keeps the full cache
        exact = next(iter(by_layer.values()))
        by_layer = {i: by_layer.get(i, exact) for i in range(n_layers)}
    return state, by_layer


def _sliding_window(text_cfg: Any, state: Any) -> tuple[int, str] | None:
    """The model's attention window in tokens and where it was found, or None: a
    config's ``sliding_window`` (unless ``use_sliding_window`` turns it off), or a site
    whose measured mask was a sliding window."""
    w = getattr(text_cfg, "sliding_window", None)
    if isinstance(w, int) and w > 0 and getattr(text_cfg, "use_sliding_window", True) is not False:
        return w, f"sliding_window={w} in its config"
    for be in state.backends.values():
        for site in be.sites:
            w = MaskStructure.window_of(site.runtime_mask)
            if w is not None:
                return w, f"{site.site}: {site.runtime_mask}"
    return None


def _is_exact(p: TileParams) -> bool:
    return p.budget_reads is None and p.budget >= 1.0


def _layer_index(model: nn.Module, path: str) -> int | None:
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    for sub in mod.modules():
        idx = getattr(sub, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return None


class NaniteCache(Cache):
    """A Hugging Face ``Cache`` bounded by the converted model's plan (module doc).

    ``converted.generate(ids, cache=NaniteCache(converted), ...)`` (older
    transformers: ``past_key_values=``), or `nanite_compile.generate`. One
    cache per generation call. Each decoder layer follows the schedule of its
    own attention site's plan.

    Args:
        model: a model returned by `nanite_compile.convert` (a Hugging Face
            decoder with ``config.num_hidden_layers``).
        context: tokens at which a fraction budget becomes reads per query
            (the schedule's reference context); default the model's
            ``max_position_embeddings``.

    Raises:
        ValueError: the model was not converted, has no attention site
            rewritten, or (below budget 1.0) has a layer whose attention stays
            exact; ``context`` not a positive int.
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def __init__(self, model: nn.Module, *, context: int | None = None) -> None:
        if Cache is object:  # pragma: no cover
            raise ImportError("NaniteCache needs transformers (pip install 'nanite-compile[hf]')")
        if not isinstance(model, nn.Module):
            raise TypeError(f"NaniteCache takes a converted nn.Module, got {type(model).__name__}")
        if "_nanite_state" not in model.__dict__:
            _layer_plans(model, 0)  # raises: not converted
        cfg = getattr(model, "config", None)
        text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        n_layers = getattr(text_cfg, "num_hidden_layers", None)
        if n_layers is None:
            raise ValueError("NaniteCache needs a Hugging Face decoder (config.num_hidden_layers)")
        if context is None:
            context = getattr(text_cfg, "max_position_embeddings", None)
            if context is None:
                raise ValueError("pass context=<tokens>: the model config has no max_position_embeddings")
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be a positive number of tokens, got {context!r}")
        state, plans = _layer_plans(model, n_layers)
        self.config = state.config
        self.context = context
        self.schedules = [make_schedule(plans[i], context) for i in range(n_layers)]
        # below budget 1.0 every layer hands the op a registered cache (an exact layer
        # too), and the Hugging Face mask covers only the new token (see get_mask_sizes)
        self.bounded = not all(sc.exact for sc in self.schedules)
        window = _sliding_window(text_cfg, state) if self.bounded else None
        if window is not None and window[0] < context:
            raise ValueError(
                f"{type(model).__name__} uses sliding-window attention ({window[1]}), which the "
                f"bounded cache does not follow past the window (it would keep summaries of "
                f"tiles outside it) and this cache's context is {context} tokens: generate "
                f"without a NaniteCache (model.generate keeps the model's own cache, and its "
                f"attention is still the tiled op), or with context <= {window[0]}")
        scales = {}
        for mod in model.modules():
            idx, sc = getattr(mod, "layer_idx", None), getattr(mod, "scaling", None)
            if isinstance(idx, int) and isinstance(sc, (int, float)):
                scales[idx] = float(sc)
        layers = [NaniteLayer(self.schedules[i], seed=state.config.seed, scale=scales.get(i),
                              register_exact=self.bounded) for i in range(n_layers)]
        super().__init__(layers=layers)
        self._mask: torch.Tensor | None = None
        _install_mask_hook(model)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the Hugging Face mask.

        For a bounded cache and one new token: ``(1, seen)``, the new token
        only. Every older entry's validity is the cache's own (summaries have
        no single position), and the op does not read the mask there; a mask
        over the new token is all-True in generation, so Hugging Face passes
        none (or one that broadcasts), whatever each layer's compressed length.
        Otherwise the full-cache sizes ``(seen + n, 0)``.
        """
        seen = self.get_seq_length(layer_idx)
        if seen > 0 and query_length != 1:
            raise NotImplementedError(
                f"NaniteCache takes the prompt once and then one token per step; got {query_length} "
                f"new tokens after {seen} (assisted or chunked decoding needs the full cache: "
                "generate without a NaniteCache)"
            )
        if self.bounded and seen > 0:
            return 1, seen
        return seen + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens of layer ``layer_idx``; return what its attention reads.

        One registered op (``nanite::cache_update``), so that Dynamo traces the
        captured attention through it without a graph break; its real
        implementation calls `_update` on the cache the model was called with.
        """
        shape = self.layers[layer_idx].next_shape
        return torch.ops.nanite.cache_update(key_states, value_states, layer_idx, shape)

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        layer = self.layers[layer_idx]
        n = key_states.shape[2]
        mask = self._mask
        if mask is None or mask.dim() != 2:
            valid = torch.ones(key_states.shape[0], n, dtype=torch.bool, device=key_states.device)
        else:
            if mask.shape[1] != layer.seen + n:
                raise ValueError(
                    f"attention_mask covers {mask.shape[1]} tokens but the cache has seen "
                    f"{layer.seen} and gets {n}: pass the 2-D mask of all tokens so far"
                )
            valid = mask[:, -n:].to(device=key_states.device, dtype=torch.bool)
        return layer.update(key_states, value_states, valid)

    def nbytes(self) -> int:
        """Bytes the cache holds (all layers)."""
        return sum(layer.nbytes() for layer in self.layers if layer.keys is not None)


# the NaniteCache of the model call in progress (set by the model's forward hooks)
_ACTIVE: contextvars.ContextVar[NaniteCache | None] = contextvars.ContextVar(
    "nanite_active_cache", default=None
)


def _install_mask_hook(model: nn.Module) -> None:
    """Make the NaniteCache a model call gets the active one, with the call's 2-D
    ``attention_mask`` (the cache's key validity); once per model."""
    if model.__dict__.get("_nanite_generation_hooks") is not None:
        return
    tokens: list = []

    def enter(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, NaniteCache):
            cache._mask = kwargs.get("attention_mask")
            _one_token_prompt(cache, args, kwargs)
        tokens.append(_ACTIVE.set(cache if isinstance(cache, NaniteCache) else None))

    def leave(module, args, kwargs, out):
        if tokens:
            _ACTIVE.reset(tokens.pop())

    model.__dict__["_nanite_generation_hooks"] = (
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True, always_call=True),
    )


def _one_token_prompt(cache: NaniteCache, args: tuple, kwargs: dict) -> None:
    """Before a prompt of one token, tell each fresh layer the length it will return.

    `cache_update` takes one new token for a decode step, whose output length is the
    layer's ``next_shape`` (set after each update; before the first it is a placeholder,
    not 1, which Dynamo would specialise on). A one-token prompt is also one new token,
    so its length is set here, outside any trace, from the call's inputs."""
    x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != 1:
        return
    for layer in cache.layers:
        if layer.seen == 0:
            layer.next_shape = torch.empty(0, layer.schedule.compressed_length(1),
                                           dtype=torch.uint8, device=x.device)


@torch.library.custom_op("nanite::cache_update", mutates_args=(), device_types=None)
def cache_update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                 next_shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``NaniteCache.update`` as an op: add the new tokens of one layer to the active cache.

    Args:
        key_states, value_states: ``[B, Hkv, n, D]`` new tokens (post-RoPE keys).
        layer_idx: the decoder layer.
        next_shape: ``[0, Nc]``, no data: the compressed length ``Nc`` the layer
            will have after one more token (so a trace knows the output shape
            without reading data).

    Returns:
        For a prompt (``n > 1``), its keys and values (a copy); for one token,
        the layer's compressed keys and values ``[B, Hkv, Nc, D]`` (the cache's
        own tensors, registered for the tiled op).
    """
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(
            "no NaniteCache is active: call the converted model itself with cache=NaniteCache(model) "
            "(its forward hooks hand the cache to the attention)"
        )
    want = next_shape.shape[1]
    k, v = cache._update(key_states, value_states, layer_idx)
    if key_states.shape[2] == 1 and k.shape[2] != want:
        raise RuntimeError(f"NaniteCache layer {layer_idx} returned {k.shape[2]} entries, "
                           f"its schedule promised {want}")
    # an op's outputs may not alias its inputs (a prompt's keys come back as they went in)
    if k.data_ptr() == key_states.data_ptr():
        k = k.clone()
    if v.data_ptr() == value_states.data_ptr():
        v = v.clone()
    return k, v


@cache_update.register_fake
def _(key_states, value_states, layer_idx, next_shape):
    if key_states.shape[2] != 1:  # a prompt: its own keys and values
        return torch.empty_like(key_states), torch.empty_like(value_states)
    n = next_shape.shape[1]
    b, h, _, d = key_states.shape
    return key_states.new_empty(b, h, n, d), value_states.new_empty(b, h, n, value_states.shape[-1])


def generate(model: nn.Module, input_ids: torch.Tensor, *, context: int | None = None,
             **kwargs: Any) -> torch.Tensor:
    """``model.generate(input_ids, ...)`` with a fresh `NaniteCache`.

    Args:
        model: a converted Hugging Face causal LM.
        input_ids: ``[B, N]`` prompt token ids (left-pad batches and pass
            ``attention_mask``).
        context: the schedule's reference context; default the prompt length
            plus ``max_new_tokens`` (or the model's ``max_position_embeddings``).
        **kwargs: passed to ``model.generate`` (``max_new_tokens``,
            ``do_sample``, ``attention_mask``, ...).

    Returns:
        What ``model.generate`` returns.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a LongTensor [B, N] of token ids")
    if "past_key_values" in kwargs or "cache" in kwargs:
        raise ValueError("nanite_compile.generate makes its own NaniteCache; call model.generate "
                         "to pass a cache yourself")
    if context is None and isinstance(kwargs.get("max_new_tokens"), int):
        context = input_ids.shape[1] + kwargs["max_new_tokens"]
    cache = NaniteCache(model, context=context)
    return model.generate(input_ids, **{cache_kwarg(model): cache}, **kwargs)

