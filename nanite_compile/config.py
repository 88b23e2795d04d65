"""The one configuration object of nanite_compile.

`NaniteConfig` is frozen, validates every field with an error that names the
fix, rejects unknown options, and round-trips through JSON. Everything that
takes options (``convert``, the ``nanite`` torch.compile backend, the CLI)
builds one of these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from .kernels.levels import DEFAULT_MAX_LEVEL, DEFAULT_SHARPNESS, SELECTS

_INNER = ("inductor", "eager")
# the operator implementations (`NaniteConfig.impl`; the op and the CLI read this too)
IMPLS = ("auto", "torch", "triton")
_FEATURE_MAPS = ("prf",)
# what calibration plans by (`NaniteConfig.objective`)
OBJECTIVES = ("model", "site")


def check_budget(budget: Any, name: str = "budget") -> float:
    """Validate a budget fraction and return it as a float.

    Args:
        budget: the share of the original attention's key reads the converted
            attention may spend, in ``(0, 1]``; ``1.0`` keeps every tile exact.
        name: the argument name used in the error message.

    Raises:
        TypeError: ``budget`` is not a real number.
        ValueError: ``budget`` is NaN or outside ``(0, 1]``.
    """
    if isinstance(budget, torch.Tensor) and budget.dim() == 0 and budget.is_floating_point():
        budget = budget.item()  # a 0-d tensor from a sweep
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"{name} must be a number in (0, 1] (the share of the original attention's "
            f"key reads to keep, e.g. 0.25), got {type(budget).__name__} {budget!r}"
        )
    budget = float(budget)
    if math.isnan(budget) or not (0.0 < budget <= 1.0):
        raise ValueError(
            f"{name} must be in (0, 1]: 1.0 keeps attention exact, 0.25 spends a quarter "
            f"of its key reads; got {budget!r}. For an absolute number of key reads per "
            f"query use NaniteConfig(budget_reads=...)"
        )
    return budget


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# the tiling `NaniteConfig.tiling` chooses when tile / window / anchors are None
AUTO_TILE = 32  # sites with at least AUTO_MIN_GROUP query heads per KV head
AUTO_TILE_FEW_HEADS = 64  # the others (MHA: one query head per KV head)
AUTO_MIN_GROUP = 3
AUTO_NEAR_TOKENS = 128
# anchors: 32 tokens' worth, at least one tile. SmolLM2, tile 32, [4k, 8k) at 0.25 / 0.1:
# one anchor tile x1.053 / x1.177 on Hamlet and x1.083 / x1.236 on Othello against two
# tiles' x1.051 / x1.198 and x1.084 / x1.270 (BENCHMARKS.md, "The fixed part")
AUTO_ANCHOR_TOKENS = 32
# near field and anchors (in tiles) when the tile is set and they are not
DEFAULT_WINDOW_TILES = 4
DEFAULT_ANCHOR_TILES = 2


@dataclass(frozen=True)
class NaniteConfig:
    """How attention is tiled and how much of it is kept.

    Attributes:
        budget: share of the original attention's key reads kept, in ``(0, 1]``,
            averaged over queries (1.0 = every tile EXACT).
        budget_reads: if set, an absolute number of key reads per query instead
            of the fraction (near field + anchors + summaries + state width);
            the cost then grows linearly in the sequence length.
        tile: tile size ``T`` in tokens, a power of two. None (the default):
            chosen per site from its query heads per KV head ``G`` (`tiling`):
            32 when ``G >= 3``, else 64, so that a block of ``G*T`` stacked
            queries is at least 64 long (with one query head per KV head, tile
            32 made the CPU op slower than SDPA at budget 0.25).
        window: near field ``w`` in tiles, the query's own tile included; always
            EXACT. None: 4 tiles; where the tile is chosen per site, 128 tokens'
            worth (4 tiles of 32, 2 of 64).
        anchors: number of leading "attention sink" tiles ``a``, always EXACT.
            None: 2 tiles; where the tile is chosen per site, 32 tokens' worth
            and at least one tile (1 tile of 32 or of 64).
        horizon: most tiles (beyond near field and anchors) a query sees at a
            POOL/EXACT level; older tiles go to the recurrent STATE. ``None``
            lets the budget decide.
        state_features: width ``F`` of the positive feature map of the STATE
            path; 0 disables STATE (tiles past the horizon are then pooled to
            one summary each).
        sharpness: how sharply a tile's key reads follow the query-aware
            estimate of the attention mass it receives (reads ~ mass**sharpness
            per query tile; 0 falls back to key dispersion over distance).
        max_level: the coarsest pooled level a kept tile is read at (summaries
            of ``2**max_level`` keys); a tile that would be read coarser is
            dropped and its reads go to others. Default 1 (pairs): coarser mean
            keys cost reads and buy little (see ``levels.DEFAULT_MAX_LEVEL``).
            None: every level up to one summary per tile. Values past
            ``log2(tile)`` mean every level.
        select: how the tiles a query reads are chosen. ``"row"``: one level
            table row per query tile, estimated from the tile before it (every
            query of the tile reads the same tiles; pooled levels and the state
            apply). ``"query"``: each query reads its own exact tiles, the ones
            its own mass estimate ranks highest within the same per-query
            allowance; the row computes the union of its queries' tiles (about
            1.8x the reads at budget 0.25 on SmolLM2), and it runs in PyTorch
            (no Triton kernel yet). Perplexity on [4k, 8k) of Hamlet at budget
            0.25: x1.031 against x1.051 (``levels.build_query_selection``).
        row_tiles: query tiles per level table row under causality: 1, or 2
            (the tiles ``2p`` and ``2p + 1`` share one choice of what lies
            before ``2p``, estimated from the two tiles before them; the CPU
            path runs each pair as one block of ``2*G*T`` queries). On SmolLM2
            (Hamlet, [4k, 8k)): x1.060 / x1.227 at budget 0.25 / 0.1 against
            x1.051 / x1.198, for an op 8-20% faster at 8k-16k.
        max_error: with calibration, the largest relative error of a site's
            attention output the cost model accepts; a site that cannot get
            under it at its share of the budget stays exact (the report says
            so). None: no bound.
        objective: with calibration, what the cost model spends the budget
            by. ``"model"`` (default): each site's end-to-end cost, how far the
            model's output (next-token KL for a language model) moves from the
            original's when that site alone runs below or above the uniform
            budget (`nanite_compile.sensitivity`; about two forwards per site
            on ``plan_tokens`` calibration tokens). ``"site"``: each site's own
            attention output error (faster; on SmolLM2 it planned worse than
            the uniform budget: layers' errors compound).
        plan_tokens: with calibration and objective ``"model"``, the sequence
            length the cost model plans at: calibration token sequences longer
            than this are cut into consecutive pieces of it (the tokens past the
            last whole piece are left out), so the sweep's
            forwards, the reads each candidate plan realises and the loss check
            all see one length (a plan's reads depend on the length: near field,
            anchors and summaries are a larger share of a short row). None: the
            calibration's own length. The sweep's forwards grow with it: SmolLM2
            calibrated on 2 x 8192 tokens of Macbeth at budget 0.25 took 548 s
            at 4096 (Hamlet's [4k, 8k) x1.043 against the original) and 1126 s
            at 8192 (x1.036); at 0.1 no plan pays at 4096 (uniform, x1.176) and
            8192 gave x1.157 in 1121 s (BENCHMARKS.md, "The length the cost
            model plans at").
        plan_check: with calibration, keep the cost model's plan only if the
            next-token loss of a causal LM on the first calibration batch is
            no worse than with every site at the uniform budget (else the
            uniform budget stays and the report says why). False keeps the
            plan unchecked (one forward less each way).
        feature_map: ``"prf"``: unbiased positive random features.
        seed: seed of the random features.
        impl: operator implementation: ``"auto"`` (Triton on CUDA when
            installed, else PyTorch), ``"torch"`` or ``"triton"`` (never falls
            back silently).
        inner: what the torch.compile backend hands the rest of the graph to.
        chunk_bytes: upper bound on the scratch memory of one chunk of query tiles.
    """

    budget: float = 0.25
    budget_reads: int | None = None
    # None: `tiling` picks them per site. Tile 32 with a near field of 4 tiles and 1
    # anchor tile (128 / 32 tokens; tile 64: 2 and 1): the level table gets a row per 32
    # queries, estimated from the 32 before it. SmolLM2 (3 query heads per KV head), 8192
    # tokens of Hamlet, [4k, 8k) perplexity against the original: budget 0.25 x1.053
    # (2 anchor tiles x1.051; tile 64: x1.074; sinks + window: x1.071), budget 0.1 x1.177
    # (2 anchor tiles x1.198; tile 64 x1.214); the
    # CPU op takes 1.3-1.7x tile 64's time there. With 1 or 2 query heads per KV head the
    # flash blocks of G*T queries are short and the gathered K/V serve fewer heads: at
    # tile 32 the op was slower than SDPA at budget 0.25 (8 / 8 heads, 8k-32k: x0.71-0.82),
    # at tile 64 faster (x1.18-1.48), so such sites get tile 64 (benchmarks/speed.py). What
    # it costs: SmolLM2 made MHA (KV heads repeated), [4k, 8k) at 0.25 / 0.1: tile 64
    # x1.073 / x1.362, tile 32 x1.054 / x1.228 (BENCHMARKS.md, "Speed history")
    tile: int | None = None
    window: int | None = None
    anchors: int | None = None
    horizon: int | None = None
    state_features: int = 64
    sharpness: float = DEFAULT_SHARPNESS
    max_level: int | None = DEFAULT_MAX_LEVEL
    select: str = "row"
    # rows of 2 query tiles (the tiles 2p and 2p + 1 share one choice of what lies before
    # 2p): SmolLM2, Hamlet [4k, 8k): x1.060 / x1.227 at budget 0.25 / 0.1 against x1.051
    # / x1.198 for rows of one tile; the CPU op 8-20% faster (blocks of 2*G*T queries)
    row_tiles: int = 1
    max_error: float | None = None
    objective: str = "model"
    plan_tokens: int | None = 4096
    plan_check: bool = True
    feature_map: str = "prf"
    seed: int = 0
    impl: str = "auto"
    inner: str = "inductor"
    chunk_bytes: int = 256 * 2**20
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", check_budget(self.budget))
        _check_int("budget_reads", self.budget_reads, 1, allow_none=True)
        _check_int("tile", self.tile, 2, allow_none=True)
        if self.tile is not None and self.tile & (self.tile - 1):
            raise ValueError(f"tile must be a power of two (e.g. 32, 64, 128) or None "
                             f"(chosen per site), got {self.tile}")
        _check_int("window", self.window, 1, allow_none=True)
        _check_int("anchors", self.anchors, 0, allow_none=True)
        _check_int("horizon", self.horizon, 0, allow_none=True)
        _check_int("state_features", self.state_features, 0)
        _check_int("max_level", self.max_level, 0, allow_none=True)
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS} (each query tile's row, or each "
                             f"query its own tiles), got {self.select!r}")
        if isinstance(self.row_tiles, bool) or self.row_tiles not in (1, 2):
            raise ValueError(f"row_tiles must be 1 (a level table row per query tile) or 2 "
                             f"(per pair of tiles), got {self.row_tiles!r}")
        _check_int("seed", self.seed, 0)
        _check_int("chunk_bytes", self.chunk_bytes, 2**16)
        if isinstance(self.sharpness, bool) or not isinstance(self.sharpness, (int, float)) \
                or not (0.0 <= float(self.sharpness) <= 16.0):
            raise ValueError(f"sharpness must be a number in [0, 16] (default {DEFAULT_SHARPNESS}), got {self.sharpness!r}")
        object.__setattr__(self, "sharpness", float(self.sharpness))
        if self.max_error is not None:
            if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) \
                    or not (float(self.max_error) > 0.0):
                raise ValueError(
                    f"max_error must be a positive number (a relative error such as 0.3) or None, "
                    f"got {self.max_error!r}")
            object.__setattr__(self, "max_error", float(self.max_error))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES} (the model's output moved "
                             f"by each site, or each site's own error), got {self.objective!r}")
        _check_int("plan_tokens", self.plan_tokens, 2, allow_none=True)
        if not isinstance(self.plan_check, bool):
            raise TypeError(f"plan_check must be True or False, got {self.plan_check!r}")
        if self.feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {_FEATURE_MAPS}, got {self.feature_map!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.inner not in _INNER:
            raise ValueError(f"inner must be one of {_INNER}, got {self.inner!r}")
        if self.extra:
            raise TypeError(f"unknown NaniteConfig options: {sorted(self.extra)}")

    def tiling(self, q_heads: int | None = None, kv_heads: int | None = None
               ) -> tuple[int, int, int]:
        """``(tile, window, anchors)`` for a site with these head counts.

        Values set in the config are kept; None ones are chosen: the tile from the
        query heads per KV head (32 with 3 or more, else 64; 32 when the counts are
        unknown or symbolic), then the near field as 128 tokens and the anchors as 32
        tokens of that tile (at least one tile each); with a tile set, 4 and 2 tiles.
        """
        tile = self.tile
        if tile is None:
            g = None
            if isinstance(q_heads, int) and isinstance(kv_heads, int) and kv_heads > 0:
                g = q_heads // kv_heads
            tile = AUTO_TILE if g is None or g >= AUTO_MIN_GROUP else AUTO_TILE_FEW_HEADS
            near = max(1, AUTO_NEAR_TOKENS // tile)
            anch = max(1, AUTO_ANCHOR_TOKENS // tile)
        else:  # a tile the user chose: the near field and anchors counted in its tiles
            near, anch = DEFAULT_WINDOW_TILES, DEFAULT_ANCHOR_TILES
        window = self.window if self.window is not None else near
        anchors = self.anchors if self.anchors is not None else anch
        return tile, window, anchors

    @classmethod
    def from_options(cls, options: dict | None = None, **overrides: Any) -> NaniteConfig:
        """Build a config from a dict of options (torch.compile ``options=``).

        Unknown keys raise ``TypeError`` naming the known ones.
        """
        merged = dict(options or {})
        merged.update(overrides)
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TypeError(
                f"unknown nanite option(s) {unknown}; known options: {sorted(known)}"
            )
        return cls(**merged)

    def replace(self, **changes: Any) -> NaniteConfig:
        return NaniteConfig.from_options(self.to_dict(), **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NaniteConfig:
        """Read what `to_json` wrote; errors are ValueError/TypeError naming the problem."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("not a NaniteConfig JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("a NaniteConfig JSON must be an object of options")
        return cls.from_options(data)
