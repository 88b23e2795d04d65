"""The query-aware mass estimate of the level rule as one Triton kernel (CUDA; CPU under
the Triton interpreter).

``levels.tile_importance`` in PyTorch is a chain of small ops per chunk of sampled
queries (matmul, bias, softmax, scatter-add); on an H200 at 64k tokens it took 18.3
of the op's 25 ms, launch-bound, and its ``[.., sampled queries, mean keys]`` scores
set the op's peak memory. Here one program per (table row, batch, KV head) loads the
row's sampled queries (all ``G`` query heads of the KV head), runs two passes over the
mean keys it may see (the online max / sum of the softmax, then the probabilities
summed per key tile) and writes the row's ``[mk]`` masses: no scores in memory.

Same inputs and output as ``tile_importance``; the sampled queries are
``levels.sampled_queries`` (shared, so both pick the same ones).
"""

from __future__ import annotations

import torch

from ._triton import Lazy, next_pow2, tl, triton
from .levels import _group_means, sampled_queries

__all__ = ["tile_importance_triton"]



def _mass_kernel(
    q_ptr, mean_ptr, logn_ptr, rq_ptr, rl_ptr, cnt_ptr, out_ptr,
    scale, G, hkv, mq, mk, C, S,
    sqb, sqh, sqn,
    E: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    BC: tl.constexpr, PRECISION: tl.constexpr,
):
    j = tl.program_id(0)  # table row
    bh = tl.program_id(1)
    b = bh // hkv
    hk = bh % hkv
    n = tl.load(cnt_ptr + j)  # sampled queries (positions) of the row
    slot = tl.arange(0, BS)  # (query head g, sampled position s) as g * S + s
    g = slot // S
    s = slot % S
    ok = (g < G) & (s < n)
    pos = tl.load(rq_ptr + j * S + s, mask=ok, other=0)
    lastq = tl.load(rl_ptr + j * S + s, mask=ok, other=-1)
    dd = tl.arange(0, BD)
    head = hk * G + g
    qv = tl.load(q_ptr + b * sqb + head[:, None] * sqh + pos[:, None] * sqn + dd[None, :],
                 mask=ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32) * scale
    hi = tl.minimum((tl.max(lastq, 0) + 1) * E, C)  # columns any query of the row sees
    base = mean_ptr + bh.to(tl.int64) * C * D
    nper = tl.maximum(n * G, 1).to(tl.float32)
    out_row = out_ptr + (bh.to(tl.int64) * mq + j) * mk
    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    inv = tl.zeros([BS], tl.float32)
    # pass 0: each query's softmax max and sum over the mean keys it sees (online);
    # pass 1: the same scores again, as probabilities summed per key tile
    for PASS in tl.static_range(2):
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        if PASS == 1:
            inv = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)  # sees nothing: 0
        for c0 in range(0, hi, BC):
            cc = c0 + tl.arange(0, BC)
            kk = tl.load(base + cc[:, None] * D + dd[None, :],
                         mask=(cc[:, None] < hi) & (dd[None, :] < D), other=0.0)
            lg = tl.load(logn_ptr + b * C + cc, mask=cc < hi, other=float("-inf"))
            sc = tl.dot(qv, tl.trans(kk), input_precision=PRECISION) + lg[None, :]
            see = ok[:, None] & ((cc // E)[None, :] <= lastq[:, None])
            sc = tl.where(see, sc, float("-inf"))
            if PASS == 0:
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sc - m_safe[:, None]), 1)
                m_i = m_new
            else:
                p = tl.exp(sc - m_safe[:, None]) * inv[:, None]  # 0 where not seen
                col = tl.sum(p, 0)  # [BC]: mass per mean key, summed over the row's queries
                tiles = tl.sum(tl.reshape(col, (BC // E, E)), 1) / nper
                tt = c0 // E + tl.arange(0, BC // E)
                tl.store(out_row + tt, tiles, mask=tt * E < hi)


_kernel = Lazy(_mass_kernel)


def tile_importance_triton(
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
) -> torch.Tensor:
    """``levels.tile_importance`` computed by one Triton kernel; same arguments and result
    (``chunk_bytes`` is unused: nothing is held per sampled query).

    Returns ``[B, Hkv, mq, mk]`` float32: each row's estimated attention mass per key
    tile, averaged over its sampled queries and the query heads of the KV head.
    """
    del chunk_bytes
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    G = h // hkv
    T = tile
    mk = n // T
    mq = mk - (nk - nq) // T
    dev = q.device
    mean, logn, E = _group_means(k, key_valid, T, means)  # [B,Hkv,mk*E,D], [B,1,mk*E]
    C = mk * E
    sel, row, last = sampled_queries(nq, nk, T, causal, stride, dev)
    # each row's sampled queries as one padded list (their order within a row does not
    # change the sums beyond rounding)
    order = torch.sort(row, stable=True).indices
    sel, row, last = sel[order], row[order], last[order]
    cnt = torch.bincount(row, minlength=mq)
    S = max(1, int(cnt.max())) if row.numel() else 1
    start = torch.cumsum(cnt, 0) - cnt
    slot = torch.arange(row.numel(), device=dev) - start[row]
    rq = torch.zeros(mq, S, dtype=torch.int32, device=dev)
    rl = torch.full((mq, S), -1, dtype=torch.int32, device=dev)
    rq[row, slot] = sel.to(torch.int32)
    rl[row, slot] = (last if causal else torch.full_like(last, mk - 1)).to(torch.int32)
    out = torch.zeros(b, hkv, mq, mk, dtype=torch.float32, device=dev)
    q_ = q if q.stride(-1) == 1 else q.contiguous()
    interpret = dev.type != "cuda"
    _kernel()[(mq, b * hkv)](
        q_, mean.contiguous(), logn.reshape(b, C).contiguous(), rq, rl,
        cnt.to(torch.int32), out,
        float(scale), G, hkv, mq, mk, C, S,
        q_.stride(0), q_.stride(1), q_.stride(2),
        E=E, D=d, BD=next_pow2(d), BS=next_pow2(G * S), BC=max(64, next_pow2(E)),
        PRECISION="ieee" if interpret else "tf32x3",
    )
    return out
