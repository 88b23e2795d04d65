"""The pyramid bank of the Triton path as one Triton kernel (CUDA; CPU under the Triton
interpreter).

``reference._pyramid`` builds the bank in PyTorch: per pool level a reshape, a sum,
a division and a log count, then one concatenation, about 50 launches for tile 64
(3.3 ms of the op at 64k tokens on an H200, most of it launch latency at shorter
lengths). Here one program per (key tile, batch x KV head) loads the tile's keys,
values and validity once and writes every level of it: level 0 (the keys, zeroed
where padded) and each level ``l``'s ``T >> l`` group means with their log counts.

The layout is ``_pyramid``'s: level ``l`` starts at ``offsets[l] = sum_{i<l} N >> i``
in ``bank_k, bank_v [B, Hkv, Nb, D]`` and ``bank_lc [B, Nb]`` (log count, ``-inf``
for a group with no valid key).
"""

from __future__ import annotations

import math

import torch

from ._triton import Lazy, next_pow2, tl, triton

__all__ = ["pyramid_triton"]



def _pyramid_kernel(
    K, V, W, BK, BV, BLC,
    hkv, n, nb,
    T: tl.constexpr, LEVELS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr,
):
    t = tl.program_id(0)  # key tile
    bh = tl.program_id(1)
    b = bh // hkv
    rows = t * T + tl.arange(0, T)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    w = tl.load(W + b.to(tl.int64) * n + rows).to(tl.float32)  # 1 valid, 0 padding
    kin = K + bh.to(tl.int64) * n * D
    vin = V + bh.to(tl.int64) * n * DV
    kk = tl.load(kin + rows[:, None] * D + dd[None, :], mask=dd[None, :] < D, other=0.0)
    vv = tl.load(vin + rows[:, None] * DV + dv[None, :], mask=dv[None, :] < DV, other=0.0)
    kk = kk.to(tl.float32) * w[:, None]
    vv = vv.to(tl.float32) * w[:, None]
    kout = BK + bh.to(tl.int64) * nb * D
    vout = BV + bh.to(tl.int64) * nb * DV
    lcout = BLC + b.to(tl.int64) * nb
    first = bh % hkv  # the program of KV head 0 writes the batch row's log counts
    tl.store(kout + rows[:, None] * D + dd[None, :], kk, mask=dd[None, :] < D)
    tl.store(vout + rows[:, None] * DV + dv[None, :], vv, mask=dv[None, :] < DV)
    tl.store(lcout + rows, tl.where(w > 0, 0.0, float("-inf")), mask=(rows * 0 + first) == 0)
    off = n
    for lvl in tl.static_range(1, LEVELS + 1):
        # T >> lvl groups of 1 << lvl keys (constexpr names cannot be reassigned per level)
        cnt = tl.sum(tl.reshape(w, (T >> lvl, 1 << lvl)), 1)
        den = tl.maximum(cnt, 1.0)
        km = tl.sum(tl.reshape(kk, (T >> lvl, 1 << lvl, BD)), 1) / den[:, None]
        vm = tl.sum(tl.reshape(vv, (T >> lvl, 1 << lvl, BDV)), 1) / den[:, None]
        grp = off + t * (T >> lvl) + tl.arange(0, T >> lvl)
        tl.store(kout + grp[:, None] * D + dd[None, :], km, mask=dd[None, :] < D)
        tl.store(vout + grp[:, None] * DV + dv[None, :], vm, mask=dv[None, :] < DV)
        tl.store(lcout + grp, tl.where(cnt > 0, tl.log(den), float("-inf")),
                 mask=(grp * 0 + first) == 0)
        off += n >> lvl


_kernel = Lazy(_pyramid_kernel)


def pyramid_triton(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, tile: int):
    """``reference._pyramid`` (without the positions) in one launch.

    Args:
        k: ``[B, Hkv, N, D]``, v: ``[B, Hkv, N, Dv]`` with ``N`` a multiple of ``tile``.
        valid: ``[B, N]`` bool.
        tile: ``T``, a power of two.

    Returns:
        ``bank_k [B, Hkv, Nb, D]``, ``bank_v [B, Hkv, Nb, Dv]`` (float32),
        ``bank_lc [B, Nb]`` and the level offsets ``[log2 T + 1]`` (int64).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, hkv, n, d = k.shape
    dv = v.shape[-1]
    T = tile
    if T & (T - 1) or n % T:
        raise ValueError(f"tile must be a power of two dividing N, got tile {T}, N {n}")
    levels = int(math.log2(T))
    offs = [sum(n >> i for i in range(lvl)) for lvl in range(levels + 1)]
    nb = offs[-1] + (n >> levels)
    dev = k.device
    bank_k = torch.empty(b, hkv, nb, d, dtype=torch.float32, device=dev)
    bank_v = torch.empty(b, hkv, nb, dv, dtype=torch.float32, device=dev)
    bank_lc = torch.empty(b, nb, dtype=torch.float32, device=dev)
    _kernel()[(n // T, b * hkv)](
        k.contiguous(), v.contiguous(), valid.to(torch.int8).contiguous(),
        bank_k, bank_v, bank_lc, hkv, n, nb,
        T=T, LEVELS=levels, D=d, DV=dv, BD=next_pow2(d), BDV=next_pow2(dv),
    )
    return bank_k, bank_v, bank_lc, torch.tensor(offs, device=dev)
