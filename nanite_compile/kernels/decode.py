"""One query token against a bounded (compressed) cache: the decode path of the op.

A bounded cache (``nanite_compile.generation.NaniteCache``) keeps, per layer,
a *compressed* key/value list ``[B, Hkv, Nc, D]``: anchor and near-field
tokens as they are, older tiles as pooled summaries (mean key, mean value),
each entry with its count ``n`` (1 for a token, the number of valid tokens
for a summary, 0 for padding), plus the recurrent state of the tiles past the
horizon: ``S = sum phi(k) v^T``, ``z = sum phi(k)`` over their tokens, with
the keys' log features shifted by ``c`` (kept on the query side, as in the
reference). ``decode_attention`` is the operator's one-query formula on that
data (kernels/README.md, "One normaliser"): entries score ``s q.k + log n``,
the state adds ``phi(q)^T S`` on the same log scale.

The cache hands the op its compressed keys and values through the model's own
``cache.update(...)`` call and registers the rest (counts, state) here, keyed
by the returned key tensor, so that ``torch.ops.nanite.tiled_attention`` (whose
schema has no room for them) finds them with `lookup`.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

from .reference import _log_features

__all__ = ["CompressedKV", "decode_attention", "lookup", "register"]


@dataclass(eq=False)
class CompressedKV:
    """What the op needs besides q for one layer's bounded decode step.

    Attributes:
        keys, values: ``[B, Hkv, Nc, D]`` compressed entries (the tensors the
            cache returned from ``update``).
        count: ``[B, Nc]`` float: tokens behind each entry (0 = none, masked).
        state_s: ``[B, Hkv, F, Dv]`` or None; ``state_z`` ``[B, Hkv, F]``;
            ``state_c`` ``[B, Hkv]`` the keys' log-feature shift.
        feature_proj: ``[Hkv, D, F]`` random-feature projections (or None).
        scale: the softmax scale the state's features were made with (None: no state).
    """

    keys: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor
    state_s: torch.Tensor | None = None
    state_z: torch.Tensor | None = None
    state_c: torch.Tensor | None = None
    feature_proj: torch.Tensor | None = None
    scale: float | None = None


_LOCK = threading.Lock()
# data_ptr of a registered key tensor -> its entry; an entry lives as long as the
# cache layer holding it, and the key tensor it holds keeps the address unique
_REGISTRY: weakref.WeakValueDictionary[int, CompressedKV] = weakref.WeakValueDictionary()
_LAST: list = [None]  # weak reference to the entry registered last


def register(entry: CompressedKV) -> None:
    """Make ``entry`` findable by the op from ``entry.keys``."""
    with _LOCK:
        _REGISTRY[entry.keys.data_ptr()] = entry
        _LAST[0] = weakref.ref(entry)


def lookup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> CompressedKV | None:
    """The registered compressed cache that ``k`` (one query, ``q [B, H, 1, D]``) comes from.

    ``k`` is the cache's own tensor, or (when the attention repeats KV heads for
    GQA, as Hugging Face's SDPA path does under a mask) a head-repeated copy of
    the entry registered last; the copy is recognised by shape and by its newest
    key. Anything else is not a compressed cache: None.
    """
    if q.shape[2] != 1 or k.dim() != 4:
        return None
    with _LOCK:
        entry = _REGISTRY.get(k.data_ptr())
        last = _LAST[0]() if _LAST[0] is not None else None
    if entry is not None and entry.keys.shape == k.shape and entry.values.shape == v.shape:
        return entry
    entry = last
    if entry is None:
        return None
    b, hkv, nc, d = entry.keys.shape
    if k.shape[0] != b or k.shape[2] != nc or k.shape[3] != d or k.shape[1] % hkv:
        return None
    rep = k.shape[1] // hkv
    newest = k[:, ::rep, -1]
    if newest.dtype != entry.keys.dtype or not torch.equal(newest, entry.keys[:, :, -1]):
        return None
    if not torch.equal(v[:, ::rep, -1], entry.values[:, :, -1]):
        return None
    return entry


def decode_attention(q: torch.Tensor, kv: CompressedKV, scale: float) -> torch.Tensor:
    """Attention of one query token over a compressed cache.

    Args:
        q: ``[B, H, 1, D]``, ``H`` a multiple of ``Hkv`` (GQA by index).
        kv: the layer's compressed cache.
        scale: softmax scale.

    Returns:
        ``[B, H, 1, Dv]`` in q's dtype.
    """
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, _, d = q.shape
    k, v = kv.keys.to(cd), kv.values.to(cd)
    hkv = k.shape[1]
    g = h // hkv
    qg = q.reshape(b, hkv, g, d).to(cd)  # [B, Hkv, G, D]
    cnt = kv.count.to(cd)
    bias = torch.where(cnt > 0, cnt.clamp_min(1.0).log(), torch.full_like(cnt, -math.inf))
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale + bias[:, None, None, :]  # [B,Hkv,G,Nc]
    m = s.amax(-1, keepdim=True)
    has_state = kv.state_s is not None
    if has_state:
        if kv.scale is None or not math.isclose(kv.scale, scale, rel_tol=1e-6):
            raise ValueError(
                f"the cache's state was built with softmax scale {kv.scale}, the attention uses "
                f"{scale}: give the cache the attention's scale"
            )
        lq = _log_features(qg, kv.feature_proj.to(cd), scale)  # [B, Hkv, G, F]
        lq = lq + kv.state_c.to(cd)[:, :, None, None]
        has = (kv.state_z > 0).any(-1)[:, :, None, None]  # [B, Hkv, 1, 1]
        ms = torch.where(has, lq.amax(-1, keepdim=True), torch.full_like(m, -math.inf))
        m = torch.maximum(m, ms)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    num = torch.matmul(e, v)  # [B, Hkv, G, Dv]
    den = e.sum(-1, keepdim=True)
    if has_state:
        wq = torch.exp(lq - m)
        num = num + torch.matmul(wq, kv.state_s.to(cd))
        den = den + torch.matmul(wq, kv.state_z.to(cd)[..., None])
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(cd).tiny), 0.0)
    return out.reshape(b, h, 1, -1).to(q.dtype)
