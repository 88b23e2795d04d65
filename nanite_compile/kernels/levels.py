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

import math
from dataclasses import dataclass

import torch

EXACT = 0
NONE = -1
STATE = -2


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
    sharpness: float = 4.0

    @property
    def max_pool(self) -> int:
        return int(math.log2(self.tile))


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
) -> torch.Tensor:
    """Query-aware estimate of the attention mass each query tile gives each key tile.

    Every query scores every key tile with Quest's upper bound on its largest
    logit, ``max_k s q.k <= s (q.c + |q|.r)`` with ``c``/``r`` the centre and
    half-range of the tile's keys per channel (two matmuls), plus the log of
    the tile's key count; a softmax over the tiles the query can see turns
    the bounds into a mass estimate, averaged over the tile's queries and the
    query heads that share the KV head. On SmolLM2 activations at 8k tokens,
    budget 0.25, driving the rule with it cuts a layer's output error from
    0.59 to 0.11 (layer 3) against key dispersion over distance; its rank
    correlation with the error of pooling one tile is the "rule estimate" row
    of ``benchmarks/density.py``.

    Args:
        q: ``[B, H, Nq, D]``, the last ``Nq`` positions.
        k: ``[B, Hkv, mk*T, D]`` keys padded to whole tiles.
        key_valid: ``[B, mk*T]`` bool.
        tile: ``T``.
        scale: softmax scale.
        causal: a query sees key tiles up to its own.
        nk: number of keys before tile padding (queries end at key ``nk - 1``).
        chunk_bytes: scratch bound for the per-query scores.
        stride: score every ``stride``-th query of a tile (and always its last
            one): the estimate is a mean over the tile's queries, and a
            sample of them is most of the signal at a fraction of the cost.

    Returns:
        ``[B, Hkv, mq, mk]`` float32, rows summing to at most 1 (0 for tiles a
        row cannot see), ``mq`` the tiles holding the queries.
    """
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    G = h // hkv
    T = tile
    mk = n // T
    f32 = torch.float32
    kt = k.to(f32).reshape(b, hkv, mk, T, d)
    w = key_valid.reshape(b, 1, mk, T, 1)
    kmin = torch.where(w, kt, torch.full_like(kt, math.inf)).amin(3)
    kmax = torch.where(w, kt, torch.full_like(kt, -math.inf)).amax(3)
    cnt = key_valid.reshape(b, mk, T).sum(-1)  # [B, mk]
    has = (cnt > 0)[:, None, :, None]
    centre = torch.where(has, 0.5 * (kmin + kmax), torch.zeros_like(kmin))
    radius = torch.where(has, 0.5 * (kmax - kmin), torch.zeros_like(kmin))
    logn = torch.where(cnt > 0, cnt.clamp_min(1).to(f32).log(), torch.full_like(cnt, -math.inf, dtype=f32))

    q0 = nk - nq  # absolute position of the first query
    jq0 = q0 // T
    mq = mk - jq0
    qpos = q0 + torch.arange(nq, device=q.device)
    if stride > 1:
        last = torch.clamp(qpos // T * T + T - 1, max=nk - 1)
        keep = ((qpos % stride) == stride - 1) | (qpos == last)
        sel = keep.nonzero().squeeze(-1)
        q = q.index_select(2, sel)
        qpos = qpos[sel]
        nq = int(sel.numel())
    qtile = qpos // T - jq0  # [Nq]
    qg = q.to(f32).reshape(b, hkv, G, nq, d)
    out = torch.zeros(b, hkv, mq, mk, dtype=f32, device=q.device)
    ki = torch.arange(mk, device=q.device)
    per_q = b * hkv * G * mk * 4 * 3
    step = max(T, int(chunk_bytes // max(per_q, 1)) // T * T)
    for s0 in range(0, nq, step):
        s1 = min(nq, s0 + step)
        qs = qg[:, :, :, s0:s1]
        ub = scale * (qs @ centre.transpose(-1, -2)[:, :, None] + qs.abs() @ radius.transpose(-1, -2)[:, :, None])
        ub = ub + logn[:, None, None, None, :]
        if causal:
            see = ki[None, :] <= (qpos[s0:s1] // T)[:, None]  # [c, mk]
            ub = ub.masked_fill(~see, -math.inf)
        p = torch.softmax(ub, dim=-1)  # [B, Hkv, G, c, mk]
        p = torch.nan_to_num(p, nan=0.0).sum(2)  # over the group's heads
        out.index_add_(2, qtile[s0:s1], p)
    nper = torch.bincount(qtile, minlength=mq).clamp_min(1).to(f32) * G
    return out / nper[None, None, :, None]


def _allowance(orig: torch.Tensor, fixed: torch.Tensor, budget: float) -> torch.Tensor:
    """Per-row key-read allowance ``max(fixed_j, min(c, orig_j))``.

    ``c`` is the largest common cap with ``sum_j allowance_j <= budget * sum_j orig_j``:
    rows whose mandatory part (near field, anchors, and the cheapest view of the
    other tiles) already costs more spend that, and the rest share what is left
    evenly per query.
    """
    target = budget * float(orig.sum())
    lo, hi = 0.0, float(orig.max())
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if float(torch.maximum(fixed, orig.clamp(max=mid)).sum()) <= target:
            lo = mid
        else:
            hi = mid
    return torch.maximum(fixed, orig.clamp(max=lo))


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

    Returns:
        ``[B, Hkv, mq, mk]`` int8 level table.
    """
    T = params.tile
    ref = density if importance is None else importance[:, :, 0]
    b, hkv, mk = ref.shape
    dev = ref.device
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
    fixed = near | anchor | forced
    middle = visible & ~fixed

    vis = visible[None, None] & tile_valid[:, None, None, :]  # [B, 1, mq, mk]
    mid = middle[None, None] & tile_valid[:, None, None, :]
    levels = torch.full((b, hkv, q_tiles.numel(), mk), NONE, dtype=torch.int8, device=dev)
    levels = torch.where(vis, torch.tensor(EXACT, dtype=torch.int8, device=dev), levels)
    exact_reads = vis.sum(-1).to(torch.float64) * T  # [B, 1, mq]: the original cost
    fixed_reads = (fixed[None, None] & tile_valid[:, None, None, :]).sum(-1).to(torch.float64) * T
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
    big = mk + 1
    mdist = torch.where(mid, adist[None, None].expand_as(mid), big).to(torch.float64)
    order_rank = mdist.argsort(dim=-1).argsort(dim=-1).to(torch.float64)  # 0 = nearest
    kept = mid & (order_rank < keep[..., None])
    folded = mid & ~kept
    has_state = folded.any(-1)  # [B, 1, mq]
    budget_left = (rem - has_state.to(torch.float64) * F).clamp_min(0.0)

    # refine kept tiles: desired reads ~ lambda * priority, one bisection per row
    if importance is None:
        dens = density[:, :, None, :].to(torch.float64)  # [B, Hkv, 1, mk]
        prio = (dens + 1e-3) / adist[None, None].clamp_min(1).to(torch.float64)
    else:
        imp = importance.to(torch.float64)
        imp = imp / imp.amax(-1, keepdim=True).clamp_min(1e-300)
        prio = imp.pow(params.sharpness) + 1e-30
    R = params.max_pool

    def reads_for(loglam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        want = (loglam[..., None].exp() * prio).clamp(1.0, float(T))
        lvl = torch.ceil(torch.log2(T / want) - 1e-9).clamp(0, R)
        reads = torch.where(kept, T / torch.exp2(lvl), torch.zeros_like(lvl)).sum(-1)
        return lvl, reads

    lo = torch.full(budget_left.shape[:-1] + (q_tiles.numel(),), -60.0, dtype=torch.float64,
                    device=dev).expand(b, hkv, -1).clone()
    hi = torch.full_like(lo, 60.0)
    bl = budget_left.expand(b, hkv, -1)
    for _ in range(48):
        midv = 0.5 * (lo + hi)
        _, r = reads_for(midv)
        ok = r <= bl
        lo = torch.where(ok, midv, lo)
        hi = torch.where(ok, hi, midv)
    lvl, _ = reads_for(lo)
    kept_b = kept.expand(b, hkv, -1, -1)
    levels = torch.where(kept_b, lvl.to(torch.int8), levels)
    levels = torch.where(folded.expand(b, hkv, -1, -1),
                         torch.tensor(STATE if use_state else R, dtype=torch.int8, device=dev),
                         levels)
    return levels


def level_reads(levels: torch.Tensor, tile: int, state_features: int) -> torch.Tensor:
    """Key reads per query of each query tile of a level table, ``[B, Hkv, mq]``."""
    lv = levels.to(torch.int64)
    per = torch.where(lv >= 0, tile >> lv.clamp_min(0), torch.zeros_like(lv))
    reads = per.sum(-1).to(torch.float64)
    return reads + (lv == STATE).any(-1).to(torch.float64) * state_features
