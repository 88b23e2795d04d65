"""Density proxies of DESIGN.md section 2: how much coarsening a key tile would destroy.

Each proxy is a plain function of the attention's own q, k, v (after RoPE).
Per-tile proxies (no query) return ``[B, Hkv, m]``; query-aware ones return
``[B, Hkv, mq, mk]``, one value per (query tile ``j``, key tile ``i``),
pooled over the ``G = H / Hkv`` query heads that share a KV head (they share
a level table). ``benchmarks/density.py`` measures which one ranks the real
error of pooling a tile best; the block top-k baseline (``baselines.py``)
scores tiles with :func:`tile_mass_estimate`.

Shapes: q ``[B, H, N, D]``, k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]``;
tile ``T``; ``m = ceil(N / T)`` tiles, the last one possibly partial (its
padding is excluded from every mean). All queries are at positions
``0 .. N-1`` (full prefill), causal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention_mass",
    "key_dispersion",
    "quest_bound",
    "state_change",
    "tile_mass_estimate",
    "tile_means",
    "value_dispersion",
]


def _tiles(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, N, D]`` -> ``[B, H, m, T, D]`` zero-padded, and the valid counts ``[m]``."""
    n = x.shape[2]
    m = -(-n // tile)
    xp = F.pad(x, (0, 0, 0, m * tile - n))
    cnt = torch.full((m,), float(tile), dtype=x.dtype, device=x.device)
    cnt[-1] = n - (m - 1) * tile
    return xp.reshape(*x.shape[:2], m, tile, x.shape[-1]), cnt


def _valid(n: int, tile: int, device) -> torch.Tensor:
    """``[m, T]`` bool, False for the padding of the last tile."""
    m = -(-n // tile)
    return (torch.arange(m * tile, device=device) < n).reshape(m, tile)


def tile_means(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean over each tile's valid tokens: ``[B, H, N, D]`` -> ``[B, H, m, D]``."""
    xt, cnt = _tiles(x, tile)
    return xt.sum(3) / cnt[:, None]


def _dispersion(x: torch.Tensor, tile: int) -> torch.Tensor:
    """The level rule's `tile_dispersion` on unpadded ``[B, H, N, D]``."""
    from .kernels.levels import tile_dispersion

    xt, _ = _tiles(x, tile)
    return tile_dispersion(xt.flatten(2, 3), _valid(x.shape[2], tile, x.device).flatten(), tile)


def key_dispersion(k: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean squared distance of a tile's keys to their mean, ``[B, Hkv, m]`` (the pooling error of the logits)."""
    return _dispersion(k, tile)


def value_dispersion(v: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean squared distance of a tile's values to their mean, ``[B, Hkv, m]``."""
    return _dispersion(v, tile)


def state_change(
    k: torch.Tensor, v: torch.Tensor, tile: int, scale: float, proj: torch.Tensor
) -> torch.Tensor:
    """The state's per-token change ``||phi(k_t)|| ||v_t||``, averaged over the tile, ``[B, Hkv, m]``.

    ``phi`` is the positive random feature map of the operator's STATE path
    (``phi(x) = exp(sqrt(s) x.W - s|x|^2/2) / sqrt(F)``, ``proj`` = ``W``
    ``[Hkv, D, F]``), so this is how much one token moves ``S = sum phi(k) v^T``.
    """
    xs = k * math.sqrt(scale)
    u = torch.einsum("bhnd,hdf->bhnf", xs, proj.to(k.dtype))
    u = u - 0.5 * (xs * xs).sum(-1, keepdim=True) - 0.5 * math.log(proj.shape[-1])
    # ||phi|| = exp(0.5 * logsumexp(2u)) without overflow
    phin = torch.exp(0.5 * torch.logsumexp(2.0 * u, dim=-1))  # [B, Hkv, N]
    per = (phin * v.norm(dim=-1))[..., None]
    pt, cnt = _tiles(per, tile)
    return pt.sum((3, 4)) / cnt


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, Hkv, G*N...]`` grouped by KV head: ``[B, Hkv, G, N, D]``."""
    b, h, n, d = q.shape
    return q.reshape(b, hkv, h // hkv, n, d)


def _pool_queries(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Mean over a query tile's valid queries and the group's heads.

    ``[B, Hkv, G, N, mk]`` -> ``[B, Hkv, mq, mk]``.
    """
    b, hkv, g, n, mk = x.shape
    xt = x.permute(0, 1, 3, 2, 4).reshape(b, hkv, n, g * mk)
    pooled = tile_means(xt, tile)  # [B, Hkv, mq, G*mk]
    return pooled.reshape(b, hkv, -1, g, mk).mean(3)


def _causal_tiles(n: int, tile: int, device) -> torch.Tensor:
    """``[N, m]`` bool: key tile ``i`` starts at or before query ``t``."""
    m = -(-n // tile)
    return torch.arange(m, device=device)[None, :] * tile <= torch.arange(n, device=device)[:, None]


def tile_mass_estimate(q: torch.Tensor, k: torch.Tensor, tile: int, scale: float) -> torch.Tensor:
    """Query-aware estimate of the attention mass tile ``j`` gives tile ``i``, ``[B, Hkv, mq, mk]``.

    Each query scores tile ``i`` by its mean key as if the tile were pooled to
    one summary, ``s q.kbar_i + log n_i``; a softmax over the tiles that start
    at or before the query turns that into an estimated share of its
    attention, averaged over the query tile's queries and the group's heads.
    ``O(N m)`` memory, never ``N x N``.
    """
    b, h, n, d = q.shape
    hkv = k.shape[1]
    kbar = tile_means(k, tile)  # [B, Hkv, m, D]
    _, cnt = _tiles(k[..., :1], tile)
    qg = _grouped(q, hkv)
    logit = torch.einsum("bhgnd,bhmd->bhgnm", qg, kbar) * scale + cnt.log()
    logit = logit.masked_fill(~_causal_tiles(n, tile, q.device), -math.inf)
    return _pool_queries(torch.softmax(logit, dim=-1), tile)


def quest_bound(q: torch.Tensor, k: torch.Tensor, tile: int, scale: float) -> torch.Tensor:
    """Quest's upper bound on a query's logit for any key of the tile, ``[B, Hkv, mq, mk]``.

    ``s sum_c max(q_c kmax_c, q_c kmin_c)`` with the per-channel min and max of
    the tile's keys, averaged over the query tile's queries and the group's
    heads (future tiles are ``-inf``).
    """
    b, h, n, d = q.shape
    hkv = k.shape[1]
    kt, _ = _tiles(k, tile)
    valid = _valid(n, tile, k.device)[None, None, :, :, None]
    kmax = kt.masked_fill(~valid, -math.inf).amax(3)  # [B, Hkv, m, D]
    kmin = kt.masked_fill(~valid, math.inf).amin(3)
    qg = _grouped(q, hkv)
    pos, neg = qg.clamp_min(0), qg.clamp_max(0)
    bound = (torch.einsum("bhgnd,bhmd->bhgnm", pos, kmax)
             + torch.einsum("bhgnd,bhmd->bhgnm", neg, kmin)) * scale
    bound = bound.masked_fill(~_causal_tiles(n, tile, q.device), 0.0)
    out = _pool_queries(bound, tile)
    m = out.shape[-1]
    future = torch.arange(m, device=q.device)[None, :] > torch.arange(m, device=q.device)[:, None]
    return out.masked_fill(future, -math.inf)


def attention_mass(
    q: torch.Tensor, k: torch.Tensor, tile: int, scale: float, chunk: int = 512
) -> torch.Tensor:
    """Exact attention mass tile ``j``'s queries give tile ``i`` (the oracle), ``[B, Hkv, mq, mk]``.

    Causal softmax over all keys, the weights summed over each key tile,
    averaged over the query tile's queries and the group's heads. Queries in
    chunks of ``chunk`` rows, so memory is ``O(chunk N)``.
    """
    b, h, n, d = q.shape
    hkv = k.shape[1]
    m = -(-n // tile)
    qg = _grouped(q, hkv)
    out = torch.zeros(b, hkv, qg.shape[2], n, m, dtype=q.dtype, device=q.device)
    kpos = torch.arange(n, device=q.device)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        logit = torch.einsum("bhgnd,bhkd->bhgnk", qg[:, :, :, s0:s1], k) * scale
        blocked = kpos[None, :] > torch.arange(s0, s1, device=q.device)[:, None]
        p = torch.softmax(logit.masked_fill(blocked, -math.inf), dim=-1)
        p = F.pad(p, (0, m * tile - n)).reshape(*p.shape[:-1], m, tile).sum(-1)
        out[:, :, :, s0:s1] = p
    return _pool_queries(out, tile)
