"""Find ``scaled_dot_product_attention`` calls, at the Dynamo and the ATen level."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import AttentionMatch, PassContext, guarded_zero, module_path, node_shape, node_value

_SDPA_TARGETS = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
}
_ATEN_SDPA = {torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def _bound_args(node: fx.Node) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    for name, arg in zip(_SDPA_ARGS, node.args, strict=False):
        bound[name] = arg
    bound.update(node.kwargs)
    return bound


def find_sdpa(gm: fx.GraphModule, ctx: PassContext) -> list[AttentionMatch]:
    """Every SDPA call in ``gm``, with the reason when it cannot be rewritten."""
    matches = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA_TARGETS:
            pattern = "sdpa"
        elif node.target in _ATEN_SDPA:
            pattern = "aten_sdpa"
        else:
            continue
        a = _bound_args(node)
        m = AttentionMatch(
            pattern=pattern,
            output=node,
            q=a["query"],
            k=a["key"],
            v=a["value"],
            mask=a["attn_mask"],
            scale=a["scale"],
            is_causal=a["is_causal"],
            module_path=module_path(node),
        )
        m.mask_kind = mask_kind_of(m.mask, m.is_causal)
        m.skip_reason = sdpa_skip_reason(a)
        if m.skip_reason is None:
            # K/V repeated per query head (Hugging Face's SDPA path with a mask): the op
            # takes them un-repeated, as from the eager finder, so that it keeps one level
            # table per KV head whether the call had a mask or not
            from .find_eager import unrepeated  # find_eager imports this module

            m.k, m.v = unrepeated(m.k, m.v)
        ctx.count(f"found_{pattern}")
        matches.append(m)
    return matches


def mask_kind_of(mask, is_causal) -> str:
    if mask is None:
        return "causal" if is_causal is True else "none"
    val = node_value(mask)
    if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
        return "dense-bool"
    return "dense-additive"


def sdpa_skip_reason(a: dict) -> str | None:
    """Why an SDPA call must stay exact, or None."""
    drop = a["dropout_p"]
    zero = guarded_zero(drop)  # a run-time float: training mode, a graph break
    if zero:
        drop = 0.0
    if zero is False:
        return "dropout_p is not 0 (training-time dropout inside attention)"
    if isinstance(drop, fx.Node):
        return ("dropout_p is a run-time value (training mode, or a graph break inside the "
                "attention), so it cannot be proven 0: attention dropout is not tiled")
    if drop not in (0, 0.0):
        return "dropout_p is not 0 (training-time dropout inside attention)"
    if isinstance(a["is_causal"], fx.Node):
        return "is_causal is not a constant"
    if a["is_causal"] and a["attn_mask"] is not None:
        return "is_causal together with attn_mask"
    q, k, v = (node_shape(a[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "q/k/v shapes unknown in the captured graph"
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        return f"q/k/v are not 4-D [B, H, N, D] (got {len(q)}-D)"
    hq, hk = q[1], k[1]
    # statically_known_true: no guard (under dynamic=True head counts are SymInts too)
    if not statically_known_true(hq == hk):
        if not a["enable_gqa"] and not (
            statically_known_true(hk == 1) and statically_known_true(v[1] == 1)
        ):
            # one key/value head broadcast over the query heads (Falcon's multi-query
            # attention) is GQA with one group; other head counts do not broadcast
            return "query and key head counts differ without enable_gqa"
        if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
            return "query heads not a multiple of key/value heads"
        # symbolic counts: SDPA with enable_gqa itself requires Hq % Hkv == 0
    mask = a["attn_mask"]
    if mask is not None:
        ms = node_shape(mask)
        if ms is None:
            return "mask shape unknown"
        val = node_value(mask)
        if isinstance(val, torch.Tensor) and not (val.dtype == torch.bool or val.is_floating_point()):
            return f"mask dtype {val.dtype} is neither bool nor floating"
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            return additive_mask_reason(mask)
    return None


def additive_mask_reason(mask: fx.Node) -> str | None:
    """Why a floating ``attn_mask`` is a bias (position bias, ALiBi), or None.

    A bias derived from parameters or buffers (T5's first layer computes its relative
    position bias from an embedding) or handed in holding values other than 0 and
    blocking ones (T5's later layers) leaves the site exact, as the eager finder does.
    A mask built by operations the finder does not follow is left to the op, which
    reads it at run time and computes a bias exactly.
    """
    from .find_eager import _bias_reason  # find_eager imports this module

    why = _bias_reason(mask)
    if why is None or "computed in the graph" in why:
        return None
    return why
