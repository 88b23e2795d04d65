"""Tiled attention in vectorised PyTorch: the CPU path and the reference.

The math is in ``kernels/README.md``. In short, for a query tile ``j`` every
visible key tile ``i`` is read at level ``L[j, i]`` from a *pyramid bank*: the
keys themselves (level 0) followed by their means over groups of ``2**r``
tokens (level ``r``), each summary carrying ``log n`` of its count as a logit
bias. Tiles at ``STATE`` are read through a positive feature map from a sum of
``phi(k)^T v`` over those tiles. Everything shares one normaliser on one log
scale, so no logit size overflows.

No Python loop runs over tiles or heads: one gather builds each query tile's
key list (padded to the longest list), one batched matmul scores it. Query
tiles are processed in chunks only to bound scratch memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .levels import (
    COARSE_GROUP_TOKENS,
    COARSE_KEEP,
    COARSE_MAX_KEPT,
    ESTIMATE_SAMPLES,
    EXACT,
    NONE,
    STATE,
    TileParams,
    build_levels,
    build_query_selection,
    coarse_kept_share,
    pad_to,
    query_tile_mass,
    tile_density,
    tile_importance,
    tile_importance_coarse_to_fine,
)
from .masks import BLOCKED_BELOW, allowed_from_mask, read_mask

__all__ = [
    "exact_attention",
    "random_features",
    "tiled_attention",
    "tiled_attention_from_levels",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """Plain softmax attention (GQA-aware), SDPA's conventions, in fp32/fp64."""
    cd = _compute_dtype(q)
    h, hkv = q.shape[1], k.shape[1]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(cd)
    out = F.scaled_dot_product_attention(
        q.to(cd), k.to(cd), v.to(cd), attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
        scale=scale, enable_gqa=h != hkv,
    )
    return out.to(q.dtype)


def random_features(d: int, f: int, hkv: int, seed: int, device, dtype) -> torch.Tensor:
    """Gaussian projections ``[Hkv, D, F]`` of the positive random feature map (seeded)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(hkv, d, f, generator=g, dtype=torch.float64)
    return w.to(device=device, dtype=dtype)


def _log_features(x: torch.Tensor, proj: torch.Tensor, scale: float) -> torch.Tensor:
    """``log phi(x)`` of FAVOR+ positive features, ``E[phi(q).phi(k)] = exp(scale q.k)``.

    Args:
        x: ``[B, Hkv, ..., D]``.
        proj: ``[Hkv, D, F]``.
    """
    xs = x * math.sqrt(scale)
    f = proj.shape[-1]
    shape = xs.shape
    flat = xs.reshape(shape[0], shape[1], -1, shape[-1])
    u = torch.einsum("bhnd,hdf->bhnf", flat, proj)
    u = u - 0.5 * (flat * flat).sum(-1, keepdim=True) - 0.5 * math.log(f)
    return u.reshape(*shape[:-1], f)


def state_tiles(kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor, proj: torch.Tensor,
                scale: float, tile: int):
    """Per key tile ``S_t = sum phi(k) v^T`` ``[B, Hkv, mk, F, Dv]`` and ``z_t = sum phi(k)``
    ``[B, Hkv, mk, F]`` with ``phi = exp(log phi - c)``, and the stabiliser ``c [B, Hkv]``
    (the largest ``log phi`` of the batch row and KV head, at least -1e30); padding keys
    add nothing. ``kc``, ``vc``: ``[B, Hkv, mk*T, .]``; ``proj``: ``[Hkv, D, F]``."""
    b, hkv, n, d = kc.shape
    mk = n // tile
    kt = kc.reshape(b, hkv, mk, tile, d)
    vt = vc.reshape(b, hkv, mk, tile, vc.shape[-1])
    lk = _log_features(kt, proj, scale)  # [B,Hkv,mk,T,F]
    lk = lk.masked_fill(~valid.reshape(b, 1, mk, tile, 1), -math.inf)
    ck = lk.amax(dim=(2, 3, 4)).clamp_min(-1e30)
    phik = torch.exp(lk - ck[:, :, None, None, None])
    return torch.einsum("bhitf,bhitd->bhifd", phik, vt), phik.sum(3), ck


def pool_levels(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, top: int,
                masked: bool = True):
    """Keys and values averaged over ``2**l`` consecutive positions, ``l = 0 .. top``.

    Yields ``(l, k_l [B, H, N >> l, D], v_l, logc_l [B, N >> l])``: the means of each
    group's valid positions and the log of their count (-inf for a group with none).
    Level 0 is the keys themselves, zeroed where padding when ``masked`` (so a masked
    key whose value is not finite cannot reach a sum through a zero weight; unmasked,
    the caller guarantees finite padding). Each level halves the previous level's sums:
    the work is about 2N whatever ``top``.
    """
    b, h, n, d = k.shape
    dv = v.shape[-1]
    w = valid.to(k.dtype)
    ksum, vsum, cnt = k, v, w
    if masked:
        ksum, vsum = k * w[:, None, :, None], v * w[:, None, :, None]
    for lvl in range(top + 1):
        if lvl:
            m = n >> lvl
            ksum = ksum.reshape(b, h, m, 2, d).sum(3)
            vsum = vsum.reshape(b, h, m, 2, dv).sum(3)
            cnt = cnt.reshape(b, m, 2).sum(-1)
            den = cnt.clamp_min(1.0)[:, None, :, None]
            km, vm = ksum / den, vsum / den
        else:
            km, vm = ksum, vsum
        yield lvl, km, vm, torch.where(cnt > 0, cnt.clamp_min(1.0).log(),
                                       torch.full_like(cnt, -math.inf))


def _pyramid(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, tile: int):
    """Bank of keys and their group means at every pool level (k, v may differ in width).

    Returns:
        bank_k, bank_v ``[B, Hkv, Nb, D]``, bank_logc ``[B, Nb]`` (log count,
        -inf for empty), bank_pos ``[Nb]`` (token position of level-0
        entries, -1 for summaries), and the offset of each level in the bank.
    """
    n = k.shape[2]
    ks, vs, lcs, poss, offs = [], [], [], [], []
    off = 0
    for lvl, km, vm, logc in pool_levels(k, v, valid, int(math.log2(tile))):
        m = n >> lvl
        ks.append(km)
        vs.append(vm)
        lcs.append(logc)
        poss.append(torch.arange(n, device=k.device) if lvl == 0
                    else torch.full((m,), -1, device=k.device, dtype=torch.long))
        offs.append(off)
        off += m
    return (torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(lcs, 1), torch.cat(poss, 0),
            torch.tensor(offs, device=k.device))


def _entry_index(levels: torch.Tensor, offsets: torch.Tensor, tile: int):
    """Bank indices of every key entry each query tile reads.

    Args:
        levels: ``[B, Hkv, mq, mk]``.

    Returns:
        idx ``[B, Hkv, mq, P]`` long and ok ``[B, Hkv, mq, P]`` bool.
    """
    lv = levels.to(torch.int64)
    seen = lv >= 0
    cnt = torch.where(seen, tile >> lv.clamp_min(0), torch.zeros_like(lv))  # [B,H,mq,mk]
    cum = cnt.cumsum(-1)
    total = cum[..., -1]
    p_max = int(total.max()) if total.numel() else 0
    p_max = max(p_max, 1)
    p = torch.arange(p_max, device=levels.device)
    pp = p.expand(*cum.shape[:-1], p_max).contiguous()
    ti = torch.searchsorted(cum.contiguous(), pp, right=True).clamp_max(lv.shape[-1] - 1)
    start = (cum - cnt).gather(-1, ti)
    li = lv.gather(-1, ti).clamp_min(0)
    g = pp - start
    idx = offsets[li] + ti * (tile >> li) + g
    ok = pp < total[..., None]
    return torch.where(ok, idx, torch.zeros_like(idx)), ok


def _check_query_keep(levels: torch.Tensor, query_keep: torch.Tensor | None) -> None:
    """A per-query selection needs whole exact tiles (no summaries, no state)."""
    if query_keep is None:
        return
    b, hkv, mq, mk = levels.shape
    if query_keep.dim() != 5 or query_keep.shape[:3] != (b, hkv, mq) or query_keep.shape[4] != mk:
        raise ValueError(f"query_keep must be [B, Hkv, mq, T, mk] for levels {tuple(levels.shape)}, "
                         f"got {tuple(query_keep.shape)}")
    if bool((levels > EXACT).any() | (levels == STATE).any()):
        raise ValueError("a per-query selection (query_keep) reads whole exact tiles: the level "
                         "table must hold only EXACT and NONE")


def tile_layout(q, k, v, key_valid, tile):
    """Pad keys to whole tiles and group queries by (KV head, query tile), in compute dtype.

    Queries are the last ``Nq`` positions; the first query tile is aligned to
    its absolute index ``jq0``. Returns ``cd, b, h, nq, d, hkv, nk, dv, G, T,
    mk, jq0, mq, qpad_front, valid [B, mk*T], kc, vc [B, Hkv, mk*T, D],
    qc [B, Hkv, mq, G, T, D]``.
    """
    cd = _compute_dtype(q)
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    G = h // hkv
    T = tile
    mk = -(-nk // T)
    npad = mk * T
    q0 = nk - nq  # absolute position of the first query
    jq0 = q0 // T
    mq = mk - jq0
    qpad_front = q0 - jq0 * T
    qpad = mq * T - nq - qpad_front
    valid = torch.ones(b, nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    valid = pad_to(valid, npad, dim=-1, value=False)
    kc, vc = pad_to(k.to(cd), npad), pad_to(v.to(cd), npad)
    qc = F.pad(q.to(cd), (0, 0, qpad_front, qpad)) if qpad_front or qpad else q.to(cd)
    qc = qc.reshape(b, hkv, G, mq, T, d).permute(0, 1, 3, 2, 4, 5)
    return cd, b, h, nq, d, hkv, nk, dv, G, T, mk, jq0, mq, qpad_front, valid, kc, vc, qc


def untile(out, b, h, hkv, G, mq, T, dv, qpad_front, nq, dtype):
    """``[B, Hkv, mq, G*T, Dv]`` back to ``[B, H, Nq, Dv]`` in ``dtype``."""
    out = out.reshape(b, hkv, mq, G, T, dv).permute(0, 1, 3, 2, 4, 5).reshape(b, h, mq * T, dv)
    return out[:, :, qpad_front:qpad_front + nq].to(dtype)


def tiled_attention_from_levels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    tile: int,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    feature_proj: torch.Tensor | None = None,
    state_phi=None,
    chunk_bytes: int = 256 * 2**20,
    query_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tiled attention for a given level table (DESIGN.md section 1).

    Args:
        q: ``[B, H, Nq, D]`` queries; they are the last ``Nq`` positions.
        k, v: ``[B, Hkv, Nk, D]``.
        levels: ``[B, Hkv, mq, mk]`` int8 level table, ``mq`` the tiles that
            hold the queries (``mq = ceil(Nk/T) - (Nk-Nq)//T`` with the first
            query tile aligned to its absolute index).
        scale: softmax scale.
        causal: block keys after the query.
        tile: ``T``.
        window: sliding window in tokens or None.
        key_valid: ``[B, Nk]`` bool or None.
        feature_proj: ``[Hkv, D, F]`` random-feature projections for STATE tiles.
        state_phi: optional callable ``x -> phi(x)`` (``[..., D] -> [..., F]``,
            positive) used instead of the exponential random features, e.g. an
            exact finite kernel map for tests; its products are not on the
            softmax scale, so it is only meaningful when every tile is STATE.
        chunk_bytes: scratch memory bound per chunk of query tiles.
        query_keep: ``[B, Hkv, mq, T, mk]`` bool or None: the tiles each query
            reads (`build_query_selection`); a query does not see the exact keys
            of the other tiles of its row's table. Needs a table of EXACT/NONE.

    Returns:
        ``[B, H, Nq, D]`` in q's dtype.
    """
    cd, b, h, nq, d, hkv, nk, dv, G, T, mk, jq0, mq, qpad_front, valid, kc, vc, qc = \
        tile_layout(q, k, v, key_valid, tile)
    _check_query_keep(levels, query_keep)
    qc = qc.reshape(b, hkv, mq, G * T, d)
    qpos = (jq0 * T + torch.arange(mq * T, device=q.device)).reshape(mq, T)
    qpos = qpos[:, None, :].expand(mq, G, T).reshape(mq, G * T)  # [mq, G*T]

    bank_k, bank_v, bank_lc, bank_pos, offs = _pyramid(kc, vc, valid, T)
    idx, ok = _entry_index(levels, offs, T)  # [B, Hkv, mq, P]
    P = idx.shape[-1]

    lv = levels.to(torch.int64)
    any_state = bool((lv == STATE).any())
    if any_state:
        kt = kc.reshape(b, hkv, mk, T, d)
        vt = vc.reshape(b, hkv, mk, T, dv)
        wt = valid.reshape(b, 1, mk, T, 1).to(cd)
        if state_phi is None:
            s_tile, z_tile, ck = state_tiles(kc, vc, valid, feature_proj.to(cd), scale, T)
            ck = ck.reshape(b, hkv, 1, 1)
        else:
            phik = state_phi(kt) * wt
            ck = None
            s_tile = torch.einsum("bhitf,bhitd->bhifd", phik, vt)  # [B,Hkv,mk,F,Dv]
            z_tile = phik.sum(3)  # [B,Hkv,mk,F]
        smask = (lv == STATE).to(cd)  # [B,Hkv,mq,mk]
        s_row = torch.einsum("bhji,bhifd->bhjfd", smask, s_tile)
        z_row = torch.einsum("bhji,bhif->bhjf", smask, z_tile)

    out = torch.empty(b, hkv, mq, G * T, dv, dtype=cd, device=q.device)
    per_tile = b * hkv * G * T * P * cd.itemsize * 4 + b * hkv * P * (d + dv) * cd.itemsize
    chunk = max(1, int(chunk_bytes // max(per_tile, 1)))
    for c0 in range(0, mq, chunk):
        c1 = min(mq, c0 + chunk)
        ii = idx[:, :, c0:c1].reshape(b, hkv, -1)
        kg = bank_k.gather(2, ii[..., None].expand(-1, -1, -1, d)).reshape(b, hkv, c1 - c0, P, d)
        vg = bank_v.gather(2, ii[..., None].expand(-1, -1, -1, dv)).reshape(b, hkv, c1 - c0, P, dv)
        lc = bank_lc[:, None, :].expand(b, hkv, -1).gather(2, ii).reshape(b, hkv, c1 - c0, P)
        pos = bank_pos[ii].reshape(b, hkv, c1 - c0, P)
        okc = ok[:, :, c0:c1]
        s = torch.matmul(qc[:, :, c0:c1], kg.transpose(-1, -2)) * scale  # [B,Hkv,c,G*T,P]
        bias = torch.where(okc, lc, torch.full_like(lc, -math.inf))
        s = s + bias[:, :, :, None, :]
        qp = qpos[c0:c1][None, None, :, :, None]  # [1,1,c,G*T,1]
        ep = pos[:, :, :, None, :]  # [B,Hkv,c,1,P]
        blocked = torch.zeros((), dtype=torch.bool, device=q.device)
        if causal:
            blocked = blocked | (ep > qp)
        if window is not None:
            blocked = blocked | ((ep >= 0) & (ep <= qp - window))
        if query_keep is not None:  # the tiles each query chose itself
            et = (pos.clamp_min(0) // T)[:, :, :, None, :].expand(-1, -1, -1, T, -1)
            sel = query_keep[:, :, c0:c1].gather(-1, et)  # [B,Hkv,c,T,P]
            sel = sel[:, :, :, None].expand(-1, -1, -1, G, -1, -1).reshape(b, hkv, c1 - c0, G * T, P)
            blocked = blocked | ((ep >= 0) & ~sel)
        s = s.masked_fill(blocked, -math.inf)
        m = s.amax(-1, keepdim=True)  # [B,Hkv,c,G*T,1]
        if any_state:
            sr, zr = s_row[:, :, c0:c1], z_row[:, :, c0:c1]
            qt = qc[:, :, c0:c1]
            if state_phi is None:
                lq = _log_features(qt, feature_proj.to(cd), scale)  # [B,Hkv,c,G*T,F]
                lq = lq + ck[..., None]  # keys' stabiliser moved to the query side
                has = (zr > 0).any(-1)[:, :, :, None, None]  # [B,Hkv,c,1,1]
                ms = torch.where(has, lq.amax(-1, keepdim=True), torch.full_like(m, -math.inf))
                m = torch.maximum(m, ms)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                wq = torch.exp(lq - m)
            else:
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                wq = state_phi(qt) * torch.exp(-m)
            num_s = torch.einsum("bhcqf,bhcfd->bhcqd", wq, sr)
            den_s = torch.einsum("bhcqf,bhcf->bhcq", wq, zr)[..., None]
        else:
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            num_s = den_s = 0.0
        e = torch.exp(s - m)
        num = torch.matmul(e, vg) + num_s
        den = e.sum(-1, keepdim=True) + den_s
        out[:, :, c0:c1] = torch.where(den > 0, num / den.clamp_min(torch.finfo(cd).tiny), 0.0)

    return untile(out, b, h, hkv, G, mq, T, dv, qpad_front, nq, q.dtype)


def _seen_keys(mask: torch.Tensor, nk: int) -> int:
    """How many leading keys matter: up to the last one some query may see, when the
    keys after it are blocked for every query (bool False or -inf, so that dropping them
    changes no sum); else ``nk``."""
    if mask.shape[-1] != nk:
        return nk
    allowed = allowed_from_mask(mask)
    if allowed is None:
        return nk
    seen = allowed.reshape(-1, nk).any(0)
    if not bool(seen.any()):
        return nk
    keep = int(seen.nonzero().max()) + 1
    if keep == nk:
        return nk
    if mask.is_floating_point() and not bool(torch.isneginf(mask[..., keep:]).all()):
        return nk
    return keep


def _row_share(params: TileParams, q_tiles: torch.Tensor, T: int) -> torch.Tensor:
    """The share of the keys before it each query tile may read: the budget, or
    ``budget_reads`` over the tokens before the tile (at most 1)."""
    if params.budget_reads is None:
        return torch.full(q_tiles.shape, float(params.budget), device=q_tiles.device)
    before = (q_tiles * T).clamp_min(1).to(torch.float32)
    return (float(params.budget_reads) / before).clamp(max=1.0)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    *,
    scale: float,
    is_causal: bool,
    params: TileParams,
    seed: int = 0,
    feature_proj: torch.Tensor | None = None,
    chunk_bytes: int = 256 * 2**20,
    stats: dict | None = None,
    fast=None,
    reuse: dict | None = None,
    require_fast: bool = False,
) -> torch.Tensor:
    """Tiled attention with the run-time level rule: the operator's CPU path.

    Takes the arguments of ``scaled_dot_product_attention`` (GQA when
    ``H > Hkv``) plus the site's tile parameters. Anything the tiled path
    cannot express exactly in structure is computed exactly: a mask that is a
    bias, rows a mask's structure does not reproduce, a sequence of one tile or
    less, a bidirectional query block shorter than its keys (cross-attention).
    A causal query block shorter than its keys (a chunk continuing a cache; its
    mask bottom-right aligned, as decoders build it) holds the last ``Nq``
    positions: its level table has the rows of its own query tiles and the
    budget is shared over those rows alone, so the call reads ``budget`` of
    what its exact attention would.
    ``stats`` (a dict), when given, receives what was done (``impl``: the
    module that computed a tiled result, ``"reference"`` when none applied).
    ``fast``, when given, is a module with ``supports(q, v, window)`` and ``run(q, k, v,
    levels, ...)`` (the arguments of ``kernels/cpu.py``'s
    ``tiled_attention_cpu``; ``kernels/triton_attn.py`` has the same) used in
    place of the reference arithmetic where it applies; the level table is the same.
    ``require_fast``: raise instead of running the reference where ``fast`` does not
    apply (``NaniteConfig.impl="triton"`` never falls back silently); exact fallbacks
    (budget 1.0, masks the tiles cannot express, ...) stay as they are.
    ``reuse``, when given, keeps the budget-independent part of the level rule
    (tile density and the query-aware mass estimate) between calls on the
    same inputs with plans that differ only in budget (the cost model's ladder).
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")

    def exact(reason: str) -> torch.Tensor:
        if stats is not None:
            stats["path"] = "exact"
            stats["reason"] = reason
        return exact_attention(q, k, v, attn_mask, scale, is_causal)

    if params.budget >= 1.0 and params.budget_reads is None:
        return exact("budget 1.0 keeps every tile exact")
    if nk <= params.tile * params.window:
        return exact("sequence within the near field")
    if nq > nk:
        return exact("more queries than keys")
    if attn_mask is not None and nq < nk:
        # keys at the end that no query may see (a static cache's empty slots, an
        # encoder's right padding) are dropped, so that the queries are the last ones
        # they see: the tiles' near field is placed by the keys the queries really read
        keep = _seen_keys(attn_mask, nk)
        if keep < nq:
            return exact(f"the queries outnumber the keys they may see ({keep}, the rest "
                         "masked for every query): cross-attention or empty cache slots")
        if keep < nk:
            k, v, attn_mask = k[:, :, :keep], v[:, :, :keep], attn_mask[..., :keep]
            nk = keep
            if nk <= params.tile * params.window:
                return exact("sequence within the near field")

    causal = bool(is_causal)
    window = None
    key_valid = None
    bad_rows = None
    if attn_mask is not None:
        st = read_mask(attn_mask, nq, nk, b)
        if st is None:
            return exact("mask is an additive bias or differs by head")
        causal, window, key_valid, bad_rows = st.causal, st.window, st.key_valid, st.bad_rows
        if stats is not None:
            stats["mask"] = st.describe()
        soft = _weakest_finite_block(attn_mask)
        if soft is not None and soft + 2.0 * _logit_bound(q, k, scale) > _NEGLIGIBLE_LOG:
            # SDPA adds the mask: a finite "blocked" value that does not outweigh the
            # logits (-1e4 next to logits of 1e4) still lets weight through
            return exact("finite mask values do not outweigh logits of this size")
        if bad_rows is not None and float(bad_rows.float().mean()) > 0.25:
            return exact("mask structure reproduces too few rows")
    elif stats is not None:
        stats["mask"] = "causal" if is_causal else "bidirectional"
    if attn_mask is None and is_causal and nq != nk:
        # SDPA aligns is_causal to the top left: the first query sees key 0 only
        return exact("causal with fewer queries than keys under SDPA's top-left alignment")
    if 1 < nq < nk and not causal:
        # a causal block is the last Nq positions (a chunk continuing a cache); without
        # causality the queries have no positions among the keys (cross-attention)
        return exact("bidirectional query block shorter than its keys (cross-attention)")
    if nq == 1 and not causal:
        causal = True  # one query at the end sees every earlier key: same as causal

    T = params.tile
    mk = -(-nk // T)
    npad = mk * T
    valid = torch.ones(b, nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    validp = pad_to(valid, npad, dim=-1, value=False)
    kc = pad_to(k.to(_compute_dtype(q)), npad)
    jq0 = (nk - nq) // T
    q_tiles = torch.arange(jq0, mk, device=q.device)
    tile_valid = validp.reshape(b, mk, T).any(-1)
    query_keep = None
    per_query = params.select == "query"
    # the mass estimate scores only the groups of tiles a coarse pass keeps for each row
    # when the input is long enough for that to pay (the Triton path's own estimate, a
    # kernel, scores every tile): it then depends on the budget
    group = max(1, COARSE_GROUP_TOKENS // T)
    fast_ok = fast is not None and fast.supports(q, v, window)  # the fast path takes this call
    fast_estimate = fast_ok and getattr(fast, "importance", None) is not None
    coarse = (not per_query and params.sharpness > 0 and not fast_estimate and causal
              and nq > 1 and window is None
              and (params.budget < 1.0 or params.budget_reads is not None))
    share = None
    if coarse:
        share = _row_share(params, q_tiles, T)
        coarse = coarse_kept_share(share, q_tiles, group, COARSE_KEEP) <= COARSE_MAX_KEPT
    key = (T, causal, "query" if per_query else params.sharpness > 0,
           (params.budget, params.budget_reads) if coarse else None)
    if reuse is not None and key in reuse:
        density, importance = reuse[key]
    else:
        with _stage("nanite.importance"):
            density = importance = None  # the rule reads one of them
            if per_query:
                importance = query_tile_mass(q, kc, validp, T, scale, causal, nk,
                                             chunk_bytes=max(chunk_bytes // 4, 2**20))
            elif params.sharpness <= 0:
                density = tile_density(kc, validp, T)
            else:
                # 8 sampled queries per tile: within 2% of scoring all 64 on SmolLM2 at 8k.
                # A fast path with its own estimate (the Triton kernel: one launch instead
                # of a chain of small ops) computes it where that path runs
                stride = max(1, T // ESTIMATE_SAMPLES)
                if coarse:
                    importance = tile_importance_coarse_to_fine(
                        q, kc, validp, T, scale, nk, share,
                        group=group, keep=COARSE_KEEP, chunk_bytes=max(chunk_bytes // 4, 2**20),
                        stride=stride)
                else:
                    estimate = fast.importance if fast_estimate else tile_importance
                    importance = estimate(q, kc, validp, T, scale, causal, nk,
                                          chunk_bytes=max(chunk_bytes // 4, 2**20), stride=stride)
        if reuse is not None:
            reuse[key] = (density, importance)
    with _stage("nanite.levels"):
        if per_query:
            q_front = nk - nq - jq0 * T
            qv = torch.zeros(q_tiles.numel() * T, dtype=torch.bool, device=q.device)
            qv[q_front:q_front + nq] = True
            levels, query_keep = build_query_selection(
                importance, q_tiles, params, causal=causal, window=window,
                tile_valid=tile_valid, query_valid=qv.reshape(-1, T),
                chunk_bytes=max(chunk_bytes // 4, 2**20))
        else:
            levels = build_levels(
                density, q_tiles, params, causal=causal, window=window,
                tile_valid=tile_valid, nk=nk, importance=importance,
            )
    if params.state_features > 0 and feature_proj is None and bool((levels == STATE).any()):
        feature_proj = random_features(d, params.state_features, hkv, seed, q.device,
                                       _compute_dtype(q))
    impl = "reference"
    with _stage("nanite.attend"):
        use_fast = fast_ok
        if query_keep is not None and use_fast and not getattr(fast, "QUERY_KEEP", False):
            # the Triton kernel reads one table row per query tile; a per-query selection
            # runs in PyTorch (the CPU path's arithmetic where it applies, else the reference)
            if require_fast:
                raise RuntimeError(
                    "select='query' (each query reads its own tiles) has no Triton kernel yet: "
                    "convert with impl='auto' or 'torch' to run it in PyTorch, or with "
                    "select='row' to use the Triton kernel")
            use_fast = False
        if require_fast and not use_fast:
            raise RuntimeError(
                f"{getattr(fast, '__name__', 'no fast path')} does not take this call (the "
                f"Triton kernel needs fp32/fp16/bf16, head widths up to 256 and no sliding "
                f"window; got {q.dtype}, D={d}, Dv={v.shape[-1]}, window={window}): convert "
                "with impl='auto' to let PyTorch run it")
        if use_fast:
            impl = fast.__name__.rsplit(".", 1)[-1]
            extra = {} if query_keep is None else {"query_keep": query_keep}
            out = fast.run(
                q, k, v, levels, scale=scale, causal=causal, tile=T, key_valid=key_valid,
                feature_proj=feature_proj, chunk_bytes=chunk_bytes, **extra,
            )
        else:
            out = tiled_attention_from_levels(
                q, k, v, levels, scale=scale, causal=causal, tile=T, window=window,
                key_valid=key_valid, feature_proj=feature_proj, chunk_bytes=chunk_bytes,
                query_keep=query_keep,
            )
    if bad_rows is not None:
        out = _repair_rows(out, q, k, v, attn_mask, scale, bad_rows)
    if stats is not None:
        from .levels import level_reads

        stats["path"] = "tiled"
        stats["impl"] = impl
        stats["levels"] = levels
        computed = float(level_reads(levels, T, params.state_features).mean())
        if query_keep is None:
            stats["reads_per_query"] = computed
        else:
            # what each query reads (its own tiles); the row computes their union
            real = qv.reshape(1, 1, -1, T).expand(query_keep.shape[:4])  # not the padding
            stats["reads_per_query"] = float(
                query_keep.sum(-1).to(torch.float64).masked_select(real).mean()) * T
            stats["computed_per_query"] = computed
        stats["exact_reads_per_query"] = _exact_reads(nq, nk, causal, window, valid)
    return out


def _stage(name: str):
    """A named range for ``torch.profiler`` (``benchmarks/speed.py --profile``)."""
    return torch.profiler.record_function(name)


# exp(-20) ~ 2e-9: a key this far below the row's largest logit is lost in fp32 rounding
_NEGLIGIBLE_LOG = -20.0


def _weakest_finite_block(mask: torch.Tensor) -> float | None:
    """The largest finite entry of an additive mask that ``read_mask`` reads as blocked."""
    if not mask.is_floating_point():
        return None
    blocked = torch.isfinite(mask) & (mask <= BLOCKED_BELOW)
    if not bool(blocked.any()):
        return None
    return float(mask[blocked].amax())


def _logit_bound(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """An upper bound on ``|scale q.k|`` over all pairs (Cauchy-Schwarz on the largest norms)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    qn = q.detach().float().norm(dim=-1).amax()
    kn = k.detach().float().norm(dim=-1).amax()
    return float(qn * kn) * abs(float(scale))


def _exact_reads(nq: int, nk: int, causal: bool, window: int | None, valid: torch.Tensor) -> float:
    """Keys the original attention reads per query (padding keys excluded), averaged."""
    qpos = torch.arange(nk - nq, nk, device=valid.device)
    cum = torch.nn.functional.pad(valid.to(torch.float64).cumsum(-1), (1, 0))  # [B, Nk+1]
    hi = qpos + 1 if causal else torch.full_like(qpos, nk)
    lo = (hi - window).clamp_min(0) if window is not None else torch.zeros_like(hi)
    n = cum[:, hi] - cum[:, lo]  # [B, Nq]
    return float(n.mean())


def _repair_rows(out, q, k, v, attn_mask, scale, bad_rows):
    """Recompute exactly the rows whose mask the tiled structure does not express."""
    bi, qi = bad_rows.nonzero(as_tuple=True)
    b, h, nq, d = q.shape
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(b, mask.shape[1], nq, k.shape[2])
    qs = q[bi, :, qi][:, :, None, :]  # [R, H, 1, D]
    ms = mask[bi, :, qi][:, :, None, :]
    rows = exact_attention(qs, k[bi], v[bi], ms, scale, False)  # [R, H, 1, D]
    out = out.clone()
    out[bi, :, qi] = rows[:, :, 0].to(out.dtype)
    return out


# levels of a table, for readers of this module
LEVEL_NAMES = {EXACT: "EXACT", NONE: "NONE", STATE: "STATE"}
