"""The level table: at which resolution each query tile sees each key tile.

A level table is data, ``[B, Hkv, mq, mk]`` int8, one entry per (query tile,
key tile) pair, shared by the query heads of one KV head (GQA):

* ``EXACT`` (0): all ``T`` keys;
* ``r`` in ``1..log2 T``: POOL(r), ``T / 2**r`` mean summaries;
* ``STATE`` (-2): folded into the recurrent state;
* ``NONE`` (-1): not seen (future tiles under causality, outside a sliding
  window, or all padding).

`build_levels` is the run-time rule of the foundation: near field and anchors
exact, the rest refined by density over distance until the per-query budget
is spent, the oldest tiles folded into the state when even one summary per
tile is more than the budget allows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXACT = 0
NONE = -1
STATE = -2


# reads of a middle tile ~ (its estimated attention mass)**DEFAULT_SHARPNESS: at budget
# 0.25 on SmolLM2 (8k tokens, [4k, 8k) perplexity) 2 gave x1.074, 4 x1.061, 6 x1.056,
# 8 x1.060 and 12 under-spent the budget (prio below the floor of the multiplier)
DEFAULT_SHARPNESS = 6.0

# the coarsest pooled level a kept tile is read at (NaniteConfig.max_level): pairs. A tile
# the rule would read coarser is dropped and its reads go to exact tiles. Mean keys of
# 4..32 tokens miss most of a tile's attention (SmolLM2 at 8k: the mass-weighted gap
# between a group's true log-mass and its mean key's logit + log n is 3-16 nats from
# layer 4 on), so they cost reads and buy little: perplexity on [4k, 8k) at budget 0.25 /
# 0.1, tile 32: Hamlet x1.056 / x1.210 with every level, x1.051 / x1.198 at 1, x1.052 /
# x1.217 at 2, x1.051 at 0 (0.25); Othello x1.093 / x1.290 with every level, x1.084 /
# x1.270 at 1
DEFAULT_MAX_LEVEL = 1

# queries per tile the causal mass estimate scores for the next row (every T / 8-th and
# the tile's last, plus the row's own first query): SmolLM2, tile 32, [4k, 8k) at budget
# 0.25 / 0.1: 8 gave Hamlet x1.051 / x1.198 and Othello x1.084 / x1.270, 2 x1.051 /
# x1.193 and x1.088 / x1.274, 16 x1.056 / x1.209 (BENCHMARKS.md); 2 would take about
# two thirds of the estimate's time off (15% of the CPU op at 16k tokens, budget 0.1)
ESTIMATE_SAMPLES = 8

# the coarse-to-fine estimate (`tile_importance_coarse_to_fine`): groups of this many
# tokens, each row keeping COARSE_KEEP times its budget's share of them (SmolLM2, Hamlet
# 0..8192, tile 32, [4k, 8k): forced on at every budget, x1.051 / x1.186 at 0.25 / 0.1
# against x1.053 / x1.177 scoring every tile). Its fine pass runs per row (small products
# over gathered keys), so it pays only when the rows keep a small share of what they
# see. Random q/k, 9 / 3 heads, tile 32, both in bf16 (min of 3, coarse to fine against
# the full estimate, the kept share in brackets): 1024 reads a query 289 against 1106 ms
# at 64k (0.11), 106 / 257 at 32k (0.21), 62 / 66 at 16k (0.39), 27 / 20 at 8k (0.68);
# 2048 reads 165 / 281 at 32k (0.31), 80 / 62 at 16k (0.57); budget 0.1 619 / 1158 at
# 64k (0.25), 176 / 270 at 32k (0.30), 74 / 87 at 16k (0.39), 42 / 27 at 8k (0.56);
# budget 0.25 373 / 249 at 32k (0.59). It runs when `coarse_kept_share` is at most
# COARSE_MAX_KEPT: the 16k rows at 0.39 gain a few ms, not worth its ~0.8% at 0.1.
COARSE_GROUP_TOKENS = 512
COARSE_KEEP = 2.0
COARSE_MAX_KEPT = 0.35

# how the tiles a query reads are chosen (TileParams.select, NaniteConfig.select)
SELECTS = ("row", "query")


@dataclass(frozen=True)
class TileParams:
    """The per-site plan the operator runs with (plain data)."""

    tile: int
    window: int
    anchors: int
    horizon: int | None
    budget: float
    budget_reads: int | None
    state_features: int
    sharpness: float = DEFAULT_SHARPNESS
    max_level: int | None = None
    # "row": one level table row per query tile (every query of the tile reads it);
    # "query": each query reads its own exact tiles (`build_query_selection`)
    select: str = "row"
    # query tiles per table row under causality (1 or 2): with 2, the tiles 2p and 2p + 1
    # share one choice of what lies before 2p (rows of 2T queries over key tiles of T),
    # which the CPU path runs as one block of 2*G*T queries
    row_tiles: int = 1

    def __post_init__(self) -> None:
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.row_tiles not in (1, 2):
            raise ValueError(f"row_tiles must be 1 or 2, got {self.row_tiles!r}")

    @property
    def max_pool(self) -> int:
        """The coarsest level a kept tile is read at: ``max_level``, at most ``log2 T``
        (None: every level); a tile that wants fewer reads is dropped."""
        full = int(math.log2(self.tile))
        return full if self.max_level is None else max(0, min(full, int(self.max_level)))


def pad_to(x: torch.Tensor, n: int, dim: int = -2, value=0.0) -> torch.Tensor:
    """``x`` padded at the end of ``dim`` to length ``n``, or ``x`` itself when it is that
    long (F.pad copies even a zero pad: at 16k tokens q, k and v were 60 MB of fresh
    memory per call). Callers never write into the result."""
    extra = n - x.shape[dim]
    if extra <= 0:
        return x
    pads = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pads, value=value)


def tile_dispersion(x: torch.Tensor, valid: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean squared distance of each tile's valid rows to their mean, ``[B, H, m]``.

    Args:
        x: ``[B, H, m*T, D]`` (keys or values), padded to whole tiles.
        valid: ``[B, m*T]`` or ``[m*T]`` bool.
        tile: ``T``.
    """
    b, h, n, d = x.shape
    m = n // tile
    xt = x.reshape(b, h, m, tile, d)
    w = valid.reshape(-1, 1, m, tile, 1).to(x.dtype)
    cnt = w.sum(dim=3).clamp_min(1.0)
    mean = (xt * w).sum(dim=3) / cnt
    return (((xt - mean.unsqueeze(3)) ** 2) * w).sum(dim=(3, 4)) / cnt.squeeze(-1)


def tile_density(k: torch.Tensor, key_valid: torch.Tensor, tile: int) -> torch.Tensor:
    """Within-tile key dispersion, the pooling error proxy of DESIGN.md section 2.

    Args:
        k: ``[B, Hkv, m*T, D]`` keys, padded to whole tiles.
        key_valid: ``[B, m*T]`` bool.
        tile: ``T``.

    Returns:
        ``[B, Hkv, m]`` `tile_dispersion` of the keys divided by its mean over
        tiles (so 1 is "typical").
    """
    disp = tile_dispersion(k, key_valid, tile)
    return disp / disp.mean(dim=-1, keepdim=True).clamp_min(1e-12)


def _group_means(k: torch.Tensor, key_valid: torch.Tensor, tile: int, means: int):
    """Each tile's keys averaged in ``E = means`` groups of consecutive keys.

    Returns the mean keys ``[B, Hkv, mk*E, D]`` (float32, padding left out), the
    log of each group's key count ``[B, 1, mk*E]`` (-inf for an empty group: the
    bias that makes a mean key stand for its keys in a softmax) and ``E``.
    """
    b, hkv, n, d = k.shape
    E = max(1, min(int(means), tile))
    if tile % E:
        raise ValueError(f"means ({E}) must divide the tile ({tile})")
    pool = tile // E  # keys per mean key
    groups = n // tile * E
    w = key_valid.reshape(b, 1, groups, pool, 1).to(torch.float32)
    cnt = w.sum(3)  # [B, 1, groups, 1]
    kg = k.to(torch.float32).reshape(b, hkv, groups, pool, d)
    if not bool(key_valid.all()):  # padding keys left out (else no copy of the keys)
        kg = kg * w
    mean = kg.sum(3) / cnt.clamp_min(1.0)
    logn = torch.where(cnt > 0, cnt.clamp_min(1.0).log(), torch.full_like(cnt, -math.inf))
    return mean, logn[..., 0], E


def sampled_queries(nq: int, nk: int, tile: int, causal: bool, stride: int,
                    device: torch.device):
    """The queries `tile_importance` scores: ``(index into the Nq queries, table row,
    last key tile each may see)``, each ``[S]`` int64.

    Every ``stride``-th query of a tile and its last one. Causal: one table row
    serves every query of its tile, so it may only depend on tokens before the tile.
    Row j is estimated from the sampled queries of tile j - 1 (each sees whole tiles
    up to its own) and from tile j's first query (which sees the tiles before j):
    nothing from inside tile j but its first token. A query block that starts inside
    a tile (a chunk continuing a cache) estimates its first row from its first query
    alone: the queries of that tile before it are not there. A single query, or bidirectional
    attention, estimates its own row from its own tile. Queries whose row lies past
    the table or that see no tile are left out.
    """
    T = tile
    q0 = nk - nq  # absolute position of the first query
    jq0 = q0 // T
    mq = -(-nk // T) - jq0
    sel = torch.arange(nq, device=device)
    qpos = q0 + sel
    if stride > 1:
        last = torch.clamp(qpos // T * T + T - 1, max=nk - 1)
        keep = ((qpos % stride) == stride - 1) | (qpos == last)
        sel = keep.nonzero().squeeze(-1)
        qpos = qpos[sel]
    last = qpos // T  # last key tile each query's scores may use
    row = qpos // T - jq0
    if causal and nq > 1:
        # each row's first query: its tile's first, or the block's first query when the
        # block (a chunk continuing a cache) starts inside a tile
        qposf = torch.arange(jq0 * T, nk, T, device=device).clamp_min(q0)
        sel = torch.cat([sel, qposf - q0])
        last = torch.cat([last, qposf // T - 1])
        row = torch.cat([row + 1, qposf // T - jq0])
    inside = (row < mq) & (last >= 0)
    if not bool(inside.all()):
        keep = inside.nonzero().squeeze(-1)
        sel, row, last = sel[keep], row[keep], last[keep]
    return sel, row, last


def tile_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float,
    causal: bool,
    nk: int,
    chunk_bytes: int = 64 * 2**20,
    stride: int = 1,
    means: int = 4,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Query-aware estimate of the attention mass each query tile gives each key tile.

    Each tile's keys are averaged in ``means`` groups of consecutive keys (each
    mean key with the log of its key count as a bias, as the pooled levels are
    read); every sampled query takes a softmax over the groups of
    the tiles it can see, and a tile's mass is the sum over its groups,
    averaged over the sampled queries and the query heads that share the KV
    head. Under causality a row is estimated from the queries of the tile
    before it, so the level table (one row per query tile) depends only on
    tokens before the tile and no output depends on a later token.

    Measured on SmolLM2 at 8192 tokens of Hamlet, budget 0.25 (perplexity on
    [4k, 8k), original = 1, tile 64): driving the level rule with this estimate
    at 4 means per tile gives x1.061 (x1.056 with ``sharpness`` 6), 8 means
    x1.062, 16 means x1.057, one mean key per tile x1.069, against x1.093 for Quest's per-channel bound on
    each tile's largest logit (the previous estimate, which had the lower
    per-layer output error) and x1.045 for the exact attention mass (the
    oracle this estimates). Those were measured while a row still used its own
    tile's sampled queries (a leak of later tokens, since fixed); with the causal
    rows 4 means and sharpness 6 give x1.075 (x1.220 at budget 0.1).

    Args:
        q: ``[B, H, Nq, D]``, the last ``Nq`` positions.
        k: ``[B, Hkv, mk*T, D]`` keys padded to whole tiles.
        key_valid: ``[B, mk*T]`` bool.
        tile: ``T``.
        scale: softmax scale.
        causal: a query sees key tiles up to its own (its own tile whole).
        nk: number of keys before tile padding (queries end at key ``nk - 1``).
        chunk_bytes: scratch bound for the per-query scores.
        stride: score every ``stride``-th query of a tile (and always its last
            one): the estimate is a mean over the tile's queries, and a
            sample of them is most of the signal at a fraction of the cost.
        means: mean keys per tile (a power of two; at most ``T``): the
            estimate costs ``means`` dot products per (sampled query, tile).
        dtype: the scores' dtype; None: `estimate_dtype` (bf16 on a CPU that has it).

    Returns:
        ``[B, Hkv, mq, mk]`` float32, rows summing to at most 1 (0 for tiles a
        row cannot see), ``mq`` the tiles holding the queries.
    """
    b, h, nq, d = q.shape
    T = tile
    mk = k.shape[2] // T
    mean, logn, E = _group_means(k, key_valid, T, means)
    mq = mk - (nk - nq) // T
    sel, row, last = sampled_queries(nq, nk, T, causal, stride, q.device)
    scrub = not bool(key_valid[:, :T].any(-1).all())
    out, nper = _sampled_mass(q, sel, row, last, mean, logn, E, scale, causal, mq, scrub,
                              chunk_bytes, dtype or estimate_dtype(q))
    return out.reshape(b, k.shape[1], mq, mk, E).sum(-1) / nper[None, None, :, None]


def estimate_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the mass estimate scores in: bfloat16 on a CPU with native bf16 products
    (oneDNN's check: AVX512-BF16 or AMX), float32 elsewhere and for float64 inputs.

    The scores only rank tiles. Their products have inner width D (64) and on the
    two-core AVX-512 machine here run at ~50 GFLOP/s in float32 (bound by writing the
    scores) against ~150 in bf16, and the softmax over them takes half the time; the
    softmax's output is summed into the rows in float32. The estimate alone (random
    q/k, 9 / 3 heads, tile 32, min of 5): 8k 42 -> 30 ms, 16k 133 -> 101 ms, 32k 401 ->
    265 ms; relative difference to float32 4e-4. SmolLM2 perplexity on Hamlet's [4k, 8k)
    x1.053 / x1.176 at budget 0.25 / 0.1 (x1.053 / x1.177 in float32)."""
    if q.device.type == "cpu" and q.dtype != torch.float64 and _native_bf16():
        return torch.bfloat16
    return torch.float32


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (asked of oneDNN once a process)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # a build without oneDNN
        return False


def _sampled_mass(q, sel, row, last, mean, logn, E, scale, causal, mq, scrub, chunk_bytes,
                  sdt):
    """Each sampled query's softmax over the mean keys of the units it may see (``last``:
    the last unit each sees under causality), summed into its row: ``[B, Hkv, mq,
    units*E]`` and the number of (query head, sample) pairs per row ``[mq]``; the
    scores in ``sdt``."""
    b, h, _, d = q.shape
    hkv = mean.shape[1]
    G = h // hkv
    f32 = torch.float32
    n_units = mean.shape[2] // E
    logn = logn[:, :, None, None, :]  # [B, 1, 1, 1, units*E]
    if causal:
        # ordered by the last unit each sample sees, a chunk's samples see nearly the same
        # columns: only the band between its smallest and largest last unit needs a mask
        order = torch.argsort(last, stable=True)
        sel, row, last = sel[order], row[order], last[order]
    q = q.index_select(2, sel)
    nq = int(q.shape[2])
    qtile = row
    qg = q.to(sdt).reshape(b, hkv, G, nq, d)
    # mass per (row, mean key) first; the mean keys of a unit are summed by the caller
    # (a reduction over a size-E innermost dim per sampled query was a third of the time)
    out = torch.zeros(b, hkv, mq, n_units * E, dtype=f32, device=q.device)
    mean_t = (mean * scale).to(sdt).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, units*E]
    logn = logn.to(sdt)
    # ``scrub``: some softmax row may be all -inf (a batch row without a valid key in the
    # first unit); when none is, the NaN scrub (a tenth of the time at 16k) is skipped
    per_q = b * hkv * G * n_units * E * 4 * 3
    step = max(1, int(chunk_bytes // max(per_q, 1)))
    # under causality a chunk scores only the mean keys up to its queries' last unit: the
    # columns past it are all masked (exp(-inf) adds nothing), so they are not computed
    last_host = last.cpu() if causal else None  # one transfer, not one per chunk
    for s0 in range(0, nq, step):
        s1 = min(nq, s0 + step)
        cols = n_units * E
        if causal:
            lo, hi = int(last_host[s0]), int(last_host[s1 - 1])  # sorted: min and max
            cols = (hi + 1) * E
            sc = torch.matmul(qg[:, :, :, s0:s1], mean_t[..., :cols]).add_(logn[..., :cols])
            if hi > lo:  # columns of units lo+1..hi are past some samples' last unit
                band = torch.arange((lo + 1) * E, cols, device=q.device) // E
                past = band[None, :] > last[s0:s1][:, None]  # [c, band]
                sc[..., (lo + 1) * E:].masked_fill_(past, -math.inf)
        else:
            sc = torch.matmul(qg[:, :, :, s0:s1], mean_t).add_(logn)  # [B, Hkv, G, c, cols]
        p = torch.softmax(sc, dim=-1)
        if scrub:
            p = p.nan_to_num_(0.0)
        out[..., :cols].index_add_(2, qtile[s0:s1].repeat(G),
                                   p.reshape(b, hkv, G * (s1 - s0), cols).to(f32))
    nper = torch.bincount(qtile, minlength=mq).clamp_min(1).to(f32) * G
    return out, nper


def coarse_kept_share(share: torch.Tensor, q_tiles: torch.Tensor, group: int,
                      keep: float = COARSE_KEEP) -> float:
    """The share of the visible tiles `tile_importance_coarse_to_fine` scores, summed over
    the rows ``q_tiles`` (absolute tile index; ``share [mq]`` as there): its ranked groups
    and the up to 3 it always keeps, against every earlier tile."""
    full = (q_tiles // group).to(torch.float32)
    kept = torch.minimum(torch.ceil(keep * share.to(torch.float32) * full), full) + 3
    kept = torch.minimum(kept, full + 1) * group
    seen = q_tiles.to(torch.float32)
    return float(torch.minimum(kept, seen).sum() / seen.sum().clamp_min(1.0))


def tile_importance_coarse_to_fine(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float,
    nk: int,
    share: torch.Tensor,
    *,
    group: int,
    keep: float = COARSE_KEEP,
    chunk_bytes: int = 64 * 2**20,
    stride: int = 1,
    means: int = 4,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`tile_importance` (causal, several queries) scored only where a coarse pass says
    the mass is: O(N * kept groups) instead of O(N^2 / T).

    The keys are cut into groups of ``group`` tiles. A coarse pass scores the same
    sampled queries against ``means`` mean keys per group (the groups wholly before the
    row) and ranks each row's groups by that mass; the row keeps its top
    ``ceil(keep * share * full groups)`` groups, plus group 0 (the anchors), its most
    recent whole group and the group its own tile opens. The fine estimate, a softmax
    over the kept groups' tiles only, is then exactly `tile_importance`'s on them; every
    other tile gets 0 (the level rule drops it or folds it into the state). On SmolLM2
    (Hamlet 0..8192, tile 32, groups of 16 tiles, keep 2, forced on) the level tables it
    drives score x1.051 / x1.186 on [4k, 8k) at budget 0.25 / 0.1 against x1.053 /
    x1.177 with the full estimate (BENCHMARKS.md, "A coarse-to-fine mass estimate").

    Args:
        q, k, key_valid, tile, scale, nk, stride, means, dtype: as `tile_importance`.
        share: ``[mq]`` the share of its visible keys each row may read (the budget).
        group: tiles per group.
        keep: groups kept per row, as a multiple of ``share`` of its whole groups.

    Returns:
        ``[B, Hkv, mq, mk]`` float32, each row summing to 1 over its kept tiles (0 for
        row 0, which has nothing before it).
    """
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    G = h // hkv
    T, S = tile, int(group)
    mk = n // T
    ng = -(-mk // S)
    dev = q.device
    f32 = torch.float32
    kp = pad_to(k, ng * S * T)
    vp = pad_to(key_valid, ng * S * T, dim=-1, value=False)
    mq = mk - (nk - nq) // T
    jq0 = mk - mq
    sel, row, last = sampled_queries(nq, nk, T, True, stride, dev)
    scrub = not bool(key_valid[:, :T].any(-1).all())

    sdt = dtype or estimate_dtype(q)
    # the coarse pass: whole groups before each sample's own tile
    cmean, clogn, Ec = _group_means(kp, vp, S * T, means)
    glast = (last + 1) // S - 1  # last whole group each sample sees
    some = glast >= 0
    gm = torch.zeros(b, hkv, mq, ng, dtype=f32, device=dev)
    if bool(some.any()):
        cm, _ = _sampled_mass(q, sel[some], row[some], glast[some], cmean, clogn, Ec, scale,
                              True, mq, True, chunk_bytes, sdt)
        gm = cm.reshape(b, hkv, mq, ng, Ec).sum(-1)

    # the groups each row keeps
    j = jq0 + torch.arange(mq, device=dev)  # each row's own tile (it sees tiles < j)
    full = j // S  # whole groups before the row
    g = torch.arange(ng, device=dev)
    forced = (g[None] == 0) | (g[None] == full[:, None] - 1) | (g[None] == full[:, None])
    forced &= g[None] * S < j[:, None]  # a group with a visible tile
    n_opt = torch.ceil(keep * share.to(f32) * full.to(f32)).to(torch.int64)
    score = gm.masked_fill(forced[None, None] | (g >= full[:, None])[None, None], -math.inf)
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    kept = forced[None, None] | ((rank < n_opt[None, None, :, None]) & (g < full[:, None]))
    n_kept = kept.sum(-1)  # [B, Hkv, mq]
    K = max(1, int(n_kept.max()))
    # each row's kept groups in order, padded with a group past the end (no keys)
    glist = torch.where(kept, g, ng).sort(-1).values[..., :K]  # [B, Hkv, mq, K]

    # the fine pass: each row's samples against its kept groups' tiles
    fmean, flogn, E = _group_means(kp, vp, T, means)  # [B, Hkv, ng*S*E, D], [B, 1, ng*S*E]
    W = S * E  # mean keys per group
    fmean = torch.cat([(fmean * scale).to(sdt).reshape(b, hkv, ng, W * d),
                       fmean.new_zeros(b, hkv, 1, W * d, dtype=sdt)], 2)  # + a padding group
    flogn = torch.cat([flogn.reshape(b, ng, W), flogn.new_full((b, 1, W), -math.inf)],
                      1).to(sdt)
    # the samples of each row in slots (rows have up to `spr`; the rest are padding)
    order = torch.argsort(row, stable=True)
    sel, row = sel[order], row[order]
    per_row = torch.bincount(row, minlength=mq)
    spr = max(1, int(per_row.max()))
    first = torch.cumsum(per_row, 0) - per_row
    slot = torch.arange(row.numel(), device=dev) - first[row]
    table = torch.full((mq, spr), -1, dtype=torch.int64, device=dev)
    table[row, slot] = torch.arange(sel.numel(), device=dev)  # into the sampled queries
    has = table >= 0  # [mq, spr]
    # only the sampled queries, in the scores' dtype (not a copy of every query)
    qf = q.index_select(2, sel).to(sdt).reshape(b, hkv, G, sel.numel(), d)
    col_tile = (glist[..., None] * S + torch.arange(S, device=dev)).reshape(b, hkv, mq, K * S)
    out = torch.zeros(b, hkv, mq, (ng + 1) * S, dtype=f32, device=dev)
    per = b * hkv * (K * W * (d + 1) * 4 + G * spr * K * W * 4 * 3)
    rc = max(1, int(chunk_bytes // max(per, 1)))
    bh = torch.arange(b * hkv, device=dev).reshape(b, hkv, 1, 1) * (ng + 1)
    for r0 in range(0, mq, rc):
        r1 = min(mq, r0 + rc)
        n_r = r1 - r0
        gl = glist[:, :, r0:r1]  # [B, Hkv, n_r, K]
        kk = fmean.reshape(-1, W * d).index_select(0, (gl + bh).reshape(-1))
        kk = kk.reshape(b, hkv, n_r, K * W, d)
        bias = flogn[torch.arange(b, device=dev).reshape(b, 1, 1, 1), gl]  # [B,Hkv,n_r,K,W]
        bias = bias.reshape(b, hkv, n_r, K * W)
        # a row's samples see the tiles before its own: mask the rest of its last group
        tiles = col_tile[:, :, r0:r1].repeat_interleave(E, -1)  # [B, Hkv, n_r, K*W]
        bias = bias.masked_fill(tiles >= j[r0:r1, None], -math.inf)
        idx = table[r0:r1].clamp_min(0)  # [n_r, spr]
        qs = qf[:, :, :, idx]  # [B, Hkv, G, n_r, spr, D]
        qs = qs.permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, n_r, G * spr, d)
        sc = torch.matmul(qs, kk.transpose(-1, -2)).add_(bias[:, :, :, None])
        p = torch.softmax(sc, dim=-1)
        if scrub:
            p = p.nan_to_num_(0.0)
        w = has[r0:r1].to(sdt).repeat(1, G)[None, None, :, :, None]  # [1,1,n_r,G*spr,1]
        mass = (p * w).sum(3, dtype=f32).reshape(b, hkv, n_r, K * S, E).sum(-1)  # [..,K*S]
        out[:, :, r0:r1].scatter_add_(-1, col_tile[:, :, r0:r1], mass)
    nper = (per_row.clamp_min(1) * G).to(f32)
    return out.div_(nper[None, None, :, None])[..., :mk]  # in place: no second table


def query_tile_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor,
    tile: int,
    scale: float,
    causal: bool,
    nk: int,
    chunk_bytes: int = 64 * 2**20,
    means: int = 4,
) -> torch.Tensor:
    """Each query's own estimate of the attention mass it gives each key tile.

    The per-query form of `tile_importance` (the ``select="query"`` rule): every
    query takes a softmax over the ``means`` mean keys of each tile (log-count
    bias), a tile's mass is the sum over its groups, averaged over the query
    heads that share the KV head (so the G heads of a position read the same
    tiles). Under causality a query scores only the tiles before its own, whose
    keys all precede it: its estimate, and so its selection, depends on nothing
    after it. The queries are laid out as the level table's rows (the last
    ``Nq`` positions, padded to whole tiles; padding positions get zeros).

    Returns:
        ``[B, Hkv, mq, T, mk]`` float32; a query's row sums to at most 1.
    """
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    G = h // hkv
    T = tile
    mk = n // T
    mean, logn, E = _group_means(k, key_valid, T, means)
    q0 = nk - nq
    jq0 = q0 // T
    mq = mk - jq0
    front = q0 - jq0 * T
    qq = torch.nn.functional.pad(q.to(torch.float32), (0, 0, front, mq * T - nq - front))
    qq = qq.reshape(b, hkv, G, mq, T, d)
    mean_t = (mean * scale).transpose(-1, -2)[:, :, None, None]  # [B, Hkv, 1, 1, D, mk*E]
    etile = torch.arange(mk * E, device=q.device) // E
    out = torch.zeros(b, hkv, mq, T, mk, dtype=torch.float32, device=q.device)
    per_row = b * hkv * G * T * mk * E * 4 * 3
    rows = max(1, int(chunk_bytes // max(per_row, 1)))
    for r0 in range(0, mq, rows):
        r1 = min(mq, r0 + rows)
        # causal: the tiles strictly before each row's own (all their keys precede it)
        cols = (jq0 + r1 - 1) * E if causal else mk * E
        if cols <= 0:
            continue
        bias = logn[:, :, None, None, None, :cols]  # [B, 1, 1, 1, 1, cols]
        if causal:
            see = etile[:cols][None, :] < (jq0 + torch.arange(r0, r1, device=q.device))[:, None]
            bias = bias.masked_fill(~see[:, None, :], -math.inf)  # [B, 1, 1, c, 1, cols]
        sc = torch.matmul(qq[:, :, :, r0:r1], mean_t[..., :cols]).add_(bias)  # [B,Hkv,G,c,T,cols]
        p = torch.softmax(sc, dim=-1).nan_to_num_(0.0)  # a row that sees nothing: 0
        mass = p.reshape(b, hkv, G, r1 - r0, T, cols // E, E).sum(-1).mean(2)
        out[:, :, r0:r1, :, : cols // E] = mass
    return out


def build_query_selection(
    query_mass: torch.Tensor,
    q_tiles: torch.Tensor,
    params: TileParams,
    *,
    causal: bool,
    window: int | None,
    tile_valid: torch.Tensor,
    query_valid: torch.Tensor,
    chunk_bytes: int = 64 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``select="query"`` rule: every query reads its own tiles.

    Each row's allowance is the same as `build_levels` gives (one common cap on
    the reads per query, within the budget), spent in whole exact tiles: every
    query keeps the row's fixed tiles (near field, anchors, window edge) and
    the middle tiles it gives the most estimated mass (``query_mass``, from
    `query_tile_mass`), as many as its allowance holds; the others it does not
    see. So each query reads at most its row's allowance, and what it reads
    depends only on itself and on the keys before it.

    Measured on SmolLM2 at 8192 tokens of Hamlet, budget 0.25 (perplexity on
    [4k, 8k) against the original): x1.031 (overall x1.020) with this estimate,
    x1.017 with each query's exact attention mass (the oracle), against x1.051
    (x1.039) for one table row shared by 32 queries. The row computes the union
    of its queries' tiles (about 1.8x the allowance at 0.25 there).

    Args:
        query_mass: ``[B, Hkv, mq, T, mk]``.
        q_tiles, params, causal, window, tile_valid: as `build_levels`.
        query_valid: ``[mq, T]`` bool, False for the padding positions of the
            query tiles (they select nothing beyond the fixed tiles).
        chunk_bytes: scratch bound of the per-query top-k.

    Returns:
        ``levels`` ``[B, Hkv, mq, mk]`` int8: EXACT for the tiles some query of
        the row reads (the union), NONE elsewhere; and ``keep``
        ``[B, Hkv, mq, T, mk]`` bool: the tiles each query reads.
    """
    b, hkv, mq, T, mk = query_mass.shape
    levels, vis, fixed, mid, exact_reads, fixed_reads, _ = _row_layout(
        q_tiles, params, causal=causal, window=window, tile_valid=tile_valid, hkv=hkv, mk=mk)
    if params.budget_reads is not None:
        allow = exact_reads.clamp(max=float(params.budget_reads))
    elif params.budget >= 1.0:
        allow = exact_reads
    else:
        allow = _allowance(exact_reads, fixed_reads, params.budget)
    # middle tiles each query of the row may add, in whole tiles: [B, 1, mq]
    n_add = ((allow - fixed_reads) / T).floor().clamp_min(0.0).to(torch.int64)
    keep = torch.zeros(b, hkv, mq, T, mk, dtype=torch.bool, device=query_mass.device)
    per_row = hkv * T * mk * 12  # the masked priorities and the top-k indices
    rows = max(1, int(chunk_bytes // max(per_row * b, 1)))
    for r0 in range(0, mq, rows):
        r1 = min(mq, r0 + rows)
        na = n_add[:, :, r0:r1]  # [B, 1, c]
        kmax = int(na.max()) if na.numel() else 0
        if kmax == 0:
            continue
        kmax = min(kmax, mk)
        m = mid[:, :, r0:r1, None, :]  # [B, 1, c, 1, mk]
        pri = query_mass[:, :, r0:r1].masked_fill(~m, -1.0)
        top = pri.topk(kmax, dim=-1).indices  # [B, Hkv, c, T, kmax]
        take = torch.arange(kmax, device=top.device) < na[:, :, :, None, None]
        sel = torch.zeros_like(keep[:, :, r0:r1]).scatter_(-1, top, take.expand_as(top))
        keep[:, :, r0:r1] = sel & m & query_valid[None, None, r0:r1, :, None]
    keep |= fixed[:, :, :, None, :]
    union = keep.any(3) | fixed  # [B, Hkv, mq, mk]
    levels = torch.where(union & vis, levels, torch.tensor(NONE, dtype=torch.int8,
                                                            device=levels.device))
    return levels, keep


def _allowance(orig: torch.Tensor, fixed: torch.Tensor, budget: float) -> torch.Tensor:
    """Per-row key-read allowance ``max(fixed_j, min(c, orig_j))``.

    ``c`` is the largest common cap with ``sum_j allowance_j <= budget * sum_j orig_j``:
    rows whose mandatory part (near field, anchors, and the cheapest view of the
    other tiles) already costs more spend that, and the rest share what is left
    evenly per query.
    """
    # allowance_j(c) = clamp(c, a_j, e_j) with a = fixed, e = max(fixed, orig): the total
    # is piecewise linear in c with kinks at the a_j and e_j, so it is solved exactly on
    # the device (sorted kinks, prefix sums), without a host round trip per step
    a = fixed.reshape(-1).to(torch.float64)
    e = torch.maximum(fixed, orig).reshape(-1).to(torch.float64)
    target = budget * orig.to(torch.float64).sum()
    a_s, e_s = a.sort().values, e.sort().values
    zero = a_s.new_zeros(1)
    sa = torch.cat([zero, a_s.cumsum(0)])  # sa[i]: sum of the i smallest a
    se = torch.cat([zero, e_s.cumsum(0)])

    def total(c: torch.Tensor) -> torch.Tensor:
        na = torch.searchsorted(a_s, c)  # a_j < c: these give min(c, e_j)
        ne = torch.searchsorted(e_s, c)  # e_j < c: these give e_j, not c
        return (sa[-1] - sa[na]) + c * na - (c * ne - se[ne])

    kinks = torch.cat([a_s, e_s]).sort().values
    ok = total(kinks) <= target
    n_ok = ok.sum()  # feasible kinks form a prefix (the total is nondecreasing)
    c0 = kinks[(n_ok - 1).clamp_min(0)]
    c1 = kinks[n_ok.clamp(max=kinks.numel() - 1)]
    # slope just right of c0: rows with a_j <= c0 < e_j take c
    slope = (torch.searchsorted(a_s, c0, right=True)
             - torch.searchsorted(e_s, c0, right=True)).to(torch.float64)
    step = torch.where(slope > 0, (target - total(c0)) / slope.clamp_min(1.0), 0.0)
    c = torch.minimum(c0 + step, c1)
    # no kink feasible: every row spends its mandatory part only
    c = torch.where(n_ok > 0, c, torch.full_like(c0, -math.inf))
    return torch.maximum(fixed, orig.clamp(max=c))


def _row_layout(q_tiles: torch.Tensor, params: TileParams, *, causal: bool,
                window: int | None, tile_valid: torch.Tensor, hkv: int, mk: int):
    """What every row of a level table sees before any budget: the visible tiles, the
    fixed ones (near field, anchors, tiles a window edge straddles) and the middle.

    Returns ``levels`` (EXACT where visible, NONE elsewhere, ``[B, Hkv, mq, mk]`` int8),
    ``vis``, ``fixed``, ``mid`` (``[B, 1, mq, mk]`` bool, padding tiles excluded),
    ``exact_reads`` and ``fixed_reads`` (``[B, 1, mq]`` float64) and ``adist``
    (``[mq, mk]``, tile distance).
    """
    T = params.tile
    b = tile_valid.shape[0]
    dev = tile_valid.device
    ki = torch.arange(mk, device=dev)
    dist = q_tiles[:, None] - ki[None, :]  # [mq, mk]
    adist = dist.abs()
    visible = (dist >= 0) if causal else torch.ones_like(dist, dtype=torch.bool)
    forced = torch.zeros_like(visible)
    if window is not None:
        # token ranges: query tile j covers [jT, jT+T-1], key tile i covers [iT, iT+T-1]
        lo_key_needed = q_tiles[:, None] * T - window + 1  # earliest key the first query sees
        hi_key_needed = q_tiles[:, None] * T + T - 1 - window + 1  # earliest key the last query sees
        tile_end = ki[None, :] * T + T - 1
        tile_start = ki[None, :] * T
        visible &= tile_end >= lo_key_needed
        forced = visible & (tile_start < hi_key_needed)  # straddles the window edge
    near = visible & (adist < params.window)
    anchor = visible & (ki[None, :] < params.anchors)
    fixed_t = near | anchor | forced
    middle = visible & ~fixed_t

    tv = tile_valid[:, None, None, :]
    vis = visible[None, None] & tv  # [B, 1, mq, mk]
    mid = middle[None, None] & tv
    fixed = fixed_t[None, None] & tv
    levels = torch.full((b, hkv, q_tiles.numel(), mk), NONE, dtype=torch.int8, device=dev)
    levels = torch.where(vis, torch.tensor(EXACT, dtype=torch.int8, device=dev), levels)
    exact_reads = vis.sum(-1).to(torch.float64) * T  # [B, 1, mq]: the original cost
    fixed_reads = fixed.sum(-1).to(torch.float64) * T
    return levels, vis, fixed, mid, exact_reads, fixed_reads, adist


def build_levels(
    density: torch.Tensor,
    q_tiles: torch.Tensor,
    params: TileParams,
    *,
    causal: bool,
    window: int | None,
    tile_valid: torch.Tensor,
    nk: int,
    importance: torch.Tensor | None = None,
    solver: str | None = None,
) -> torch.Tensor:
    """The run-time level rule: distance and density within the budget.

    Args:
        density: ``[B, Hkv, mk]`` tile density (1 = typical); only read when
            ``importance`` is None (may then be None).
        q_tiles: ``[mq]`` absolute index of each query tile.
        params: the site's tile parameters.
        causal: causal attention.
        window: sliding window in tokens, or None.
        tile_valid: ``[B, mk]`` bool, False for tiles that are all padding.
        nk: number of keys (without tile padding).
        importance: ``[B, Hkv, mq, mk]`` from `tile_importance`; when given, the
            reads of a middle tile grow as ``importance ** params.sharpness``
            (a sharp preference for the tiles that take the attention mass),
            otherwise as density over distance.
        solver: how each row's multiplier is found (same tables up to ties at
            the 1e-9 level): ``"bisect"`` (36 halvings; cheapest on a CPU),
            ``"sort"`` (exact, from the sorted level thresholds; a few
            launches, for a GPU), ``"topk"`` (the bisection on each row's
            highest-priority tiles only, never the whole table in float64; for few
            reads a query), None: `default_solver`.

    Returns:
        ``[B, Hkv, mq, mk]`` int8 level table.
    """
    ref = density if importance is None else importance[:, :, 0]
    b, hkv, mk = ref.shape
    T = params.tile
    dev = ref.device
    levels, vis, fixed, mid, exact_reads, fixed_reads, adist = _row_layout(
        q_tiles, params, causal=causal, window=window, tile_valid=tile_valid, hkv=hkv, mk=mk)
    n_mid = mid.sum(-1).to(torch.float64)
    use_state = params.state_features > 0 and window is None
    F = float(params.state_features) if use_state else 0.0
    # the cheapest view of a row's middle tiles: one summary each, or the state alone
    min_mid = torch.minimum(n_mid, torch.full_like(n_mid, F)) if use_state else n_mid
    if params.budget_reads is not None:
        allow = exact_reads.clamp(max=float(params.budget_reads))
    elif params.budget >= 1.0:
        return levels
    else:
        allow = _allowance(exact_reads, fixed_reads + min_mid, params.budget)
    ra = _pair_firsts(q_tiles, params, causal, window)
    if ra is not None:
        # a pair spends what its two rows were allowed: the first row's own choice gets
        # (allow_a + allow_b - T) / 2 and the second reads the same plus tile 2p exactly
        # (its near field anyway); each within the first row's fixed part and exact reads
        rb = ra + 1
        share = (allow[..., ra] + allow[..., rb] - T) / 2
        lo = (fixed_reads + min_mid)[..., ra]
        # a pair whose share cannot pay the first row's cheapest plan stays two rows (in
        # every batch row: the table's rows are shared by the batch's layout)
        ok = (share >= lo).all(0).all(0)  # [pairs]
        ra, share = ra[ok], share[..., ok]
        rb = ra + 1
        allow = allow.clone()
        allow[..., ra] = torch.minimum(share, exact_reads[..., ra])
        if importance is not None:
            # the pair's estimate: the rows of the two tiles before it (both before 2p)
            importance = importance.clone()
            prev = (ra - 1).clamp_min(0)
            importance[:, :, ra] = (importance[:, :, ra] + importance[:, :, prev]) / 2
    rem = allow - fixed_reads  # reads left for middle tiles, [B, 1, mq]
    if bool((rem >= n_mid * T).all()):
        return levels  # the budget covers every tile exactly

    # how many of the nearest middle tiles stay visible: all of them while one summary
    # per tile fits; otherwise (and if the state is the cheaper view) the oldest fold
    # into the state and what is left after its F reads keeps the nearest ones
    fold = (rem < n_mid) & (n_mid > F) if use_state else torch.zeros_like(rem, dtype=torch.bool)
    afford = (rem - F).clamp_min(0.0).floor()
    keep = torch.where(fold, torch.minimum(afford, n_mid), n_mid)
    if params.horizon is not None:
        keep = keep.clamp(max=float(params.horizon))
    # rank middle tiles by distance: nearest first
    if not use_state and params.horizon is None:
        kept = mid  # every middle tile stays a candidate (keep = n_mid)
    elif causal:
        # middle tiles all lie before the query tile: the nearer ones are the later ones, and
        # a tile is among the `keep` nearest when fewer than `keep` middle tiles follow it,
        # i.e. when the middle tiles up to it (inclusive) number more than n_mid - keep
        kept = mid & (mid.cumsum(-1, dtype=torch.int32) > (n_mid - keep)[..., None])
    else:
        big = mk + 1
        mdist = torch.where(mid, adist[None, None].expand_as(mid), big).to(torch.float64)
        order_rank = mdist.argsort(dim=-1).argsort(dim=-1).to(torch.float64)  # 0 = nearest
        kept = mid & (order_rank < keep[..., None])
    folded = mid & ~kept
    has_state = folded.any(-1)  # [B, 1, mq]
    budget_left = (rem - has_state.to(torch.float64) * F).clamp_min(0.0)

    # refine kept tiles: desired reads ~ lambda * priority, one multiplier per row
    R = params.max_pool
    bl = budget_left.expand(b, hkv, -1)
    kept_b = kept.expand(b, hkv, -1, -1)
    if solver is None:
        numel = b * hkv * q_tiles.numel() * mk
        # `few` needs the budget on the host: asked only where the sort solver is not taken
        few = default_solver(dev, numel, R) != "sort" and _most_kept(bl, T, R) < mk // 4
        solver = default_solver(dev, numel, R, few=few)
    if importance is None:
        dens = density[:, :, None, :].to(torch.float64)  # [B, Hkv, 1, mk]
        prio = ((dens + 1e-3) / adist[None, None].clamp_min(1).to(torch.float64)).expand(
            b, hkv, -1, -1)
    if solver == "topk":
        # the tiles are ranked by what their priority grows with: the mass estimate (float32,
        # the priority itself is only formed for the chosen tiles), or the priority
        rowmax = None if importance is None else importance.amax(-1, keepdim=True)

        def base_of(val: torch.Tensor) -> torch.Tensor:
            return _threshold_base(
                val if rowmax is None else _mass_priority(val, params.sharpness, rowmax), T)

        levels = _levels_by_topk(prio if importance is None else importance, base_of,
                                 kept_b, levels, T, bl, R)
    else:
        if importance is None:
            base = _threshold_base(prio, T)
        else:
            base = _threshold_base(_mass_priority(importance, params.sharpness), T)
        if solver == "sort":
            lvl = _levels_by_sort(base, kept, T, bl, R)
        elif solver == "bisect":
            lvl = _levels_by_bisection(base, kept, T, bl, R)
        else:
            raise ValueError(f"solver must be 'sort', 'bisect', 'topk' or None, got {solver!r}")
        lvl = torch.where(lvl > R, float(NONE), lvl)  # dropped: wants less than one read
        levels = torch.where(kept_b, lvl.to(torch.int8), levels)
    # past the horizon without a state: one summary per tile, whatever max_level says
    levels = torch.where(folded.expand(b, hkv, -1, -1),
                         torch.tensor(STATE if use_state else int(math.log2(T)), dtype=torch.int8,
                                      device=dev),
                         levels)
    if ra is not None and ra.numel():  # a pair's second row reads the first's before 2p
        before = torch.arange(mk, device=dev)[None, :] < q_tiles[ra][:, None]  # [pairs, mk]
        levels[:, :, ra + 1] = torch.where(before, levels[:, :, ra], levels[:, :, ra + 1])
    return levels


def _pair_firsts(q_tiles: torch.Tensor, params: TileParams, causal: bool,
                 window: int | None) -> torch.Tensor | None:
    """Rows that start a pair of query tiles (absolute index even, a next row exists)
    under ``row_tiles=2``; None when rows are single (or not causal, or windowed)."""
    if params.row_tiles != 2 or not causal or window is not None or q_tiles.numel() < 2:
        return None
    r = torch.arange(q_tiles.numel() - 1, device=q_tiles.device)
    ra = r[q_tiles[:-1] % 2 == 0]
    return ra if ra.numel() else None


# the sort solver holds about four [B, Hkv, mq, mk, R + 1] fp64/int64 tensors at once;
# past this many elements in one of them (128 MiB) the bisection, which needs none, runs
SORT_SOLVER_MAX_ELEMENTS = 2**24


def default_solver(device: torch.device, numel: int, R: int, few: bool = False) -> str:
    """``"sort"`` on CUDA (a few launches instead of 36 steps) while its scratch stays
    small: ``numel * (R + 1)`` elements per tensor, ``numel`` the table's size; else
    ``"topk"`` when ``few`` (no row can keep a quarter of its tiles: only each row's
    highest-priority ones are solved for), else ``"bisect"`` (at tile 32 and 64k tokens
    the sort would need about 2.4 GB)."""
    if device.type == "cuda" and numel * (R + 1) <= SORT_SOLVER_MAX_ELEMENTS:
        return "sort"
    return "topk" if few else "bisect"


def _most_kept(budget: torch.Tensor, T: int, R: int) -> int:
    """One more than the most kept tiles any row can afford: a kept tile costs at least
    ``T >> R`` reads. Only a row's ``most`` smallest level thresholds can change its
    answer (with that many at level ``<= R`` its reads are over its budget)."""
    return int(float(budget.max().clamp_min(0.0)) // (T * 2.0 ** -R)) + 1


def _mass_priority(importance: torch.Tensor, sharpness: float,
                   rowmax: torch.Tensor | None = None) -> torch.Tensor:
    """A tile's priority from its estimated mass: ``(m / row max) ** sharpness`` in float64
    (plus 1e-30, so a tile without mass has a finite threshold); ``importance`` may be a
    row's selected entries when ``rowmax`` (its whole row's max) is given."""
    imp = importance.to(torch.float64)
    top = imp.amax(-1, keepdim=True) if rowmax is None else rowmax.to(torch.float64)
    return (imp / top.clamp_min(1e-300)).pow(sharpness) + 1e-30


def _threshold_base(prio: torch.Tensor, T: int) -> torch.Tensor:
    """A kept tile's level at multiplier ``lam`` is ``ceil(log2(T / (lam * prio)))``:
    ``ceil(base - log2(lam))`` with this ``base``, computed once (the solvers' loops are
    launch-bound on a GPU and memory-bound on the CPU)."""
    return math.log2(T) - torch.log2(prio)


def _bisect_x(keys: torch.Tensor, budget: torch.Tensor, T: int, R: int) -> torch.Tensor:
    """The largest ``x = log2(lam)`` in [-87, 87] (to 2.5e-9) at which the kept tiles of a
    row, ``keys [rows, n]`` their level-0 thresholds sorted ascending (``inf``: not a
    tile), fit ``budget [rows]``: a tile is at level ``<= l`` exactly when
    ``base <= x + l``, so each step is one ``searchsorted`` of ``R + 1`` points into the
    row, not a pass over the table."""
    ls = torch.arange(R + 1, dtype=keys.dtype, device=keys.device)
    # reads per tile at level l relative to level 0: 2**-l; the count at level <= l
    # minus the count at level <= l - 1 is the number of tiles at exactly l
    rel = torch.exp2(-ls)
    rel = rel - torch.cat([rel[1:], rel.new_zeros(1)])  # sum_l c_l (2**-l - 2**-(l+1)), 0 past R

    def reads(x: torch.Tensor) -> torch.Tensor:
        c = torch.searchsorted(keys, x[:, None] + 1e-9 + ls, right=True)  # [rows, R + 1]
        return (c.to(keys.dtype) * rel).sum(-1) * T

    lo = torch.full_like(budget, -87.0)
    hi = torch.full_like(budget, 87.0)
    for _ in range(36):
        midv = 0.5 * (lo + hi)
        ok = reads(midv) <= budget
        lo = torch.where(ok, midv, lo)
        hi = torch.where(ok, hi, midv)
    return lo


def _levels_by_bisection(base: torch.Tensor, kept: torch.Tensor, T: int, bl: torch.Tensor,
                         R: int) -> torch.Tensor:
    """Levels ``clamp(ceil(base - x), 0, R + 1)`` at the largest ``x = log2(lam)`` whose
    reads fit ``bl``, per row, by bisection on ``x`` in [-87, 87] (`_bisect_x`).

    Level ``R + 1`` means dropped: the tile wants less than one read
    (``lam * priority < 1``) and is not seen at all, so its summary read goes to
    the tiles that take the attention (at budget 0.1 on SmolLM2 this took
    perplexity on [4k, 8k) from x1.336 to x1.198; at 0.25 x1.056 to x1.055).
    36 halvings leave 2.5e-9, far finer than the gaps between distinct level
    thresholds of real inputs. (The whole level rule at 16k tokens, tile 32, budget
    0.1: 111 ms -> 42 ms on the CPU against a pass over the table per step.)
    """
    shape = base.shape
    mk = shape[-1]
    budget = bl.expand(shape[:-1]).reshape(-1)
    keys = torch.where(kept, base, math.inf).reshape(-1, mk).sort(-1).values  # [rows, mk]
    x = _bisect_x(keys, budget, T, R).reshape(shape[:-1])
    return torch.ceil(base - x[..., None] - 1e-9).clamp_(0, R + 1)


def _levels_by_topk(score: torch.Tensor, base_of, kept: torch.Tensor, levels: torch.Tensor,
                    T: int, bl: torch.Tensor, R: int) -> torch.Tensor:
    """`_levels_by_bisection`'s table from each row's ``most`` (`_most_kept`) kept tiles of
    largest ``score`` only (``score >= 0``, in the order of the priority; ``base_of`` maps
    the chosen scores to their level-0 thresholds): the row cannot afford one more tile,
    and every other tile has a larger threshold, so it is dropped either way. Their
    thresholds are solved for and scattered into ``levels`` (the other kept tiles become
    NONE); no float64 pass over the whole table. Ties are harmless: tiles the priority
    cannot tell apart (below its 1e-30 floor) are dropped either way. The whole level rule
    at 64k tokens, tile 32, 1024 reads a query (random q/k, CPU, 2 threads): 0.59-0.76 s
    with the bisection over the table, 0.12-0.14 s this way; 16k at budget 0.1: 15-18 ms
    against 11-12."""
    b, hkv, mq, mk = levels.shape
    budget = bl.reshape(-1)
    most = _most_kept(budget, T, R)
    val, idx = torch.topk(score.masked_fill(~kept, -1.0), min(most, mk), dim=-1,
                          largest=True, sorted=False)  # other tiles rank last
    live = val >= 0
    base = base_of(val).masked_fill(~live, math.inf)
    x = _bisect_x(base.reshape(-1, base.shape[-1]).sort(-1).values, budget, T, R)
    lvl = torch.ceil(base - x.reshape(b, hkv, mq, 1) - 1e-9).clamp_(0, R + 1)
    lvl = torch.where(live & (lvl <= R), lvl, float(NONE)).to(torch.int8)
    out = levels.masked_fill(kept, NONE)
    return out.scatter_(-1, idx, torch.where(live, lvl, out.gather(-1, idx)))


def _levels_by_sort(base: torch.Tensor, kept: torch.Tensor, T: int, bl: torch.Tensor,
                    R: int) -> torch.Tensor:
    """`_levels_by_bisection`'s levels, exactly, without a loop.

    A tile leaves level ``l + 1`` for ``l`` when ``x`` reaches its threshold
    ``base - l - 1e-9``, adding ``T * 2**-(l+1)`` reads (``T * 2**-R``
    from dropped to level ``R``). Sorting every row's thresholds and summing what
    they add gives the reads after each; the last threshold whose whole group of
    equal thresholds still fits is ``x``, clamped to the bisection's range.
    """
    ls = torch.arange(R + 1, dtype=torch.float64, device=base.device)
    thr = base[..., None] - ls - 1e-9  # [..., mk, R + 1]
    live = kept[..., None].expand(*base.shape, 1)
    thr = torch.where(live, thr, math.inf)
    gain = torch.exp2(-(ls + 1))
    gain[-1] = 2.0 ** -R  # dropped -> level R: the tile's one summary
    add = torch.where(live, T * gain, 0.0).expand_as(thr)
    flat, order = thr.flatten(-2).sort(-1)
    spent = add.flatten(-2).gather(-1, order).cumsum(-1)
    group_end = torch.searchsorted(flat, flat, right=True) - 1  # last equal threshold
    spent = spent.gather(-1, group_end)
    n_ok = (spent <= bl[..., None]).sum(-1, keepdim=True)  # a prefix
    x = flat.gather(-1, (n_ok - 1).clamp_min(0))
    x = torch.where(n_ok > 0, x, -87.0).clamp(max=87.0)  # [..., 1]
    crossed = (thr <= x[..., None]).sum(-1)  # [..., mk]
    return (R + 1 - crossed).to(torch.float64)


def level_reads(levels: torch.Tensor, tile: int, state_features: int) -> torch.Tensor:
    """Key reads per query of each query tile of a level table, ``[B, Hkv, mq]``."""
    # a count per level present (a few passes over the int8 table, not an int64 copy of it:
    # 64k tokens, tile 32: 55 ms against 210)
    reads = torch.zeros(levels.shape[:-1], dtype=torch.float64, device=levels.device)
    for lvl in range(int(levels.max()) + 1 if levels.numel() else 0):
        reads += (levels == lvl).sum(-1, dtype=torch.int32) * float(tile >> lvl)
    return reads + (levels == STATE).any(-1).to(torch.float64) * state_features
