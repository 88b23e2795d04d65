"""The STATE path's per-tile sums of the Triton path as Triton kernels (CUDA; CPU under
the Triton interpreter).

The state a query tile reads is ``S_j = sum phi(k) v^T`` and ``z_j = sum phi(k)``
over the tiles its row folds (``kernels/README.md``, "The state (PRF)"), with
``phi(k) = exp(log phi(k) - c)`` and ``c`` the largest ``log phi`` over every key of
the (batch, KV head). In PyTorch that is the features of every key
``[B, Hkv, N, F]`` in memory, their maximum, their exponent and a contraction with
the values. Here the features never reach memory: one kernel computes, per
(key tile, batch x KV head), ``log phi`` of the tile's keys and keeps its maximum;
after one PyTorch max over the tiles, the same kernel in its second mode computes
them again, exponentiates and writes the tile's ``S_t [F, Dv]`` and ``z_t [F]``.
The prefix sums over tiles and the per-row differences stay in PyTorch
(``cpu._state_rows``: a cumulative sum and two gathers).
"""

from __future__ import annotations

import math

import torch

from ._triton import Lazy, next_pow2, tl, triton

__all__ = ["state_tiles_triton"]



def _state_tile_kernel(
    K, V, VALID, W, CK, TMAX, S_TILE, Z_TILE,
    sqrt_scale, half_scale, half_log_f, hkv, n, mk,
    T: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    SUMS: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)  # key tile
    bh = tl.program_id(1)
    b = bh // hkv
    hk = bh % hkv
    r = tl.arange(0, BT)
    rows = t * T + r
    r_ok = r < T
    dd = tl.arange(0, BD)
    ff = tl.arange(0, BF)
    ok = r_ok & (tl.load(VALID + b.to(tl.int64) * n + rows, mask=r_ok, other=0) != 0)
    kk = tl.load(K + (bh.to(tl.int64) * n + rows[:, None]) * D + dd[None, :],
                 mask=r_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
    w = tl.load(W + hk.to(tl.int64) * D * F + dd[:, None] * F + ff[None, :],
                mask=(dd[:, None] < D) & (ff[None, :] < F), other=0.0)
    # log phi(k) = sqrt(s) k . W_f - s |k|^2 / 2 - log(F) / 2 (FAVOR+ positive features)
    u = tl.dot(kk, w, input_precision=PRECISION) * sqrt_scale
    u = u - half_scale * tl.sum(kk * kk, 1)[:, None] - half_log_f
    u = tl.where(ok[:, None] & (ff[None, :] < F), u, float("-inf"))
    if SUMS:
        ck = tl.load(CK + bh)
        phi = tl.exp(u - ck)  # 0 for padding keys and padding features
        dv = tl.arange(0, BDV)
        vv = tl.load(V + (bh.to(tl.int64) * n + rows[:, None]) * DV + dv[None, :],
                     mask=r_ok[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
        s = tl.dot(tl.trans(phi), vv, input_precision=PRECISION)  # [BF, BDV]
        tile = bh.to(tl.int64) * mk + t
        tl.store(S_TILE + (tile * F + ff[:, None]) * DV + dv[None, :], s,
                 mask=(ff[:, None] < F) & (dv[None, :] < DV))
        tl.store(Z_TILE + tile * F + ff, tl.sum(phi, 0), mask=ff < F)
    else:
        tl.store(TMAX + bh.to(tl.int64) * mk + t, tl.max(tl.max(u, 1), 0))


_kernel = Lazy(_state_tile_kernel)


def state_tiles_triton(kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor,
                       proj: torch.Tensor, scale: float, tile: int):
    """Per key tile ``S_t = sum_k phi(k) v^T`` and ``z_t = sum_k phi(k)`` at the keys'
    stabiliser ``c`` (the largest ``log phi`` of the (batch, KV head), at least -1e30).

    Args:
        kc: ``[B, Hkv, N, D]``, vc: ``[B, Hkv, N, Dv]``, ``N`` a multiple of ``tile``.
        valid: ``[B, N]`` bool (padding keys add nothing).
        proj: ``[Hkv, D, F]`` the random features.

    Returns:
        ``s_tile [B, Hkv, mk, F, Dv]``, ``z_tile [B, Hkv, mk, F]`` and ``c [B, Hkv]``
        (float32).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, hkv, n, d = kc.shape
    dv = vc.shape[-1]
    f = proj.shape[-1]
    T = tile
    mk = n // T
    dev = kc.device
    prec = "ieee" if dev.type != "cuda" else "tf32x3"
    kc_, vc_ = kc.contiguous(), vc.contiguous()
    w = proj.to(device=dev, dtype=torch.float32).contiguous()
    ok = valid.to(torch.int8).contiguous()
    tmax = torch.empty(b, hkv, mk, dtype=torch.float32, device=dev)
    s_tile = torch.empty(b, hkv, mk, f, dv, dtype=torch.float32, device=dev)
    z_tile = torch.empty(b, hkv, mk, f, dtype=torch.float32, device=dev)
    consts = dict(T=T, D=d, DV=dv, F=f, BT=next_pow2(T), BD=next_pow2(d),
                  BDV=next_pow2(dv), BF=next_pow2(f), PRECISION=prec)
    args = (math.sqrt(scale), 0.5 * scale, 0.5 * math.log(f), hkv, n, mk)
    kern = _kernel()
    grid = (mk, b * hkv)
    kern[grid](kc_, vc_, ok, w, tmax, tmax, s_tile, z_tile, *args, SUMS=False, **consts)
    ck = tmax.amax(-1).clamp_min(-1e30).contiguous()  # [B, Hkv]
    kern[grid](kc_, vc_, ok, w, ck, tmax, s_tile, z_tile, *args, SUMS=True, **consts)
    return s_tile, z_tile, ck
