"""What every graph pass shares: the match record and the pass context.

A *finder* pass reads a captured FX graph and returns `AttentionMatch`es; the
rewrite pass turns each rewritable match into one call of
``torch.ops.nanite.tiled_attention``. Passes have the signature
``(gm, ctx) -> result`` and run as an ordered list (see ``passes/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..config import NaniteConfig


def node_value(node: Any) -> Any:
    """The example value Dynamo (``example_value``) or export (``val``) stored on a node."""
    if not isinstance(node, fx.Node):
        return node
    meta = node.meta
    if "val" in meta:
        return meta["val"]
    return meta.get("example_value")


def node_shape(node: Any) -> tuple | None:
    val = node_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def guarded_zero(node: Any) -> bool | None:
    """Whether a run-time float (a training-mode dropout under dynamic floats) is 0 on
    this graph's input, as a guard of the graph: it runs only while that holds (Dynamo
    recompiles when it changes, e.g. a dropout set to 0.1 after the compile). None
    when there is nothing to decide by (not a symbolic float, or one without a hint)."""
    val = node_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.SymFloat):
        return None
    try:
        return bool(val == 0)
    except Exception:  # an unbacked value: no hint
        return None


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # Dynamo spells module paths as L['self'].layers[0].self_attn or L['args'][0].q_proj
    import re

    path = re.sub(r"^L\['(self|fn)'\]\.?", "", path)
    path = re.sub(r"^L\['args'\]\[0\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = path.replace("_modules.", "").replace("forward.__self__.", "").strip(".")
    return path


@dataclass
class AttentionMatch:
    """One attention found in a graph.

    Attributes:
        pattern: which pattern matched: ``sdpa``, ``aten_sdpa``, ``eager``,
            ``einsum``, ``bmm`` (nn.MultiheadAttention's slow path), ...
        output: the node whose value is the attention output ``[B, H, Nq, Dv]``
            (replaced by the op's call).
        q, k, v: nodes (or values) in ``[B, H, N, D]`` / ``[B, Hkv, N, D]`` layout;
            ``k``/``v`` before any GQA repeat.
        mask: mask node (bool or additive, broadcastable to ``[B, H, Nq, Nk]``) or None.
        scale: softmax scale (float, a node holding a scalar, or None for ``D**-0.5``).
        is_causal: SDPA's causal flag (a mask node may add more structure).
        interior: the chain's own nodes (left for dead-code elimination).
        mask_kind: what the graph says about the mask: ``none``, ``causal``,
            ``dense`` (read at run time: causal, padding, sliding window), ``bias``.
        skip_reason: why this match is left exact, or None to rewrite it.
        module_path: module that computed it.
        view_4d: for 3-D forms (``[B*H, N, D]``), True: q/k/v are unsqueezed to 4-D
            and the output squeezed back.
    """

    pattern: str
    output: fx.Node
    q: Any
    k: Any
    v: Any
    mask: Any = None
    scale: Any = None
    is_causal: bool = False
    interior: list = field(default_factory=list)
    mask_kind: str = "none"
    skip_reason: str | None = None
    module_path: str = ""
    view_4d: bool = False


@dataclass
class PassContext:
    """State shared by the passes run on one graph.

    Attributes:
        config: the conversion's configuration.
        site_prefix: module path the graph was captured from ("" for a whole model).
        plans: per-site overrides of tile parameters (site name -> dict).
        sites: report entries appended by the rewrite pass.
        counters: how many matches each pass found and rewrote (tests assert on these).
        graph_index: how many graphs the backend compiled before this one.
        site_tag: appended to each site name in the op's ``site`` argument
            (``"@c3"``), so a cost model can address this conversion's sites.
    """

    config: NaniteConfig
    site_prefix: str = ""
    plans: dict = field(default_factory=dict)
    sites: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    graph_index: int = 0
    site_tag: str = ""

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n
