"""Replace each rewritable attention match by one ``nanite::tiled_attention`` call.

Before rewriting, the chain is checked on the graph (networkx): every interior
node of the chain may only be used inside the chain, so deleting it changes
nothing else (an intermediate that escapes, e.g. attention weights returned to
the caller, leaves the site exact with that reason).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import networkx as nx
import torch
import torch.fx as fx

from ..kernels import ops  # noqa: F401  (registers torch.ops.nanite.*)
from ..kernels.levels import TileParams
from ..report import SiteReport
from .base import AttentionMatch, PassContext, node_shape

# the reason of a site whose intermediates (attention weights) leave the chain
ESCAPES = "used elsewhere"


def graph_to_nx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def escaping_nodes(m: AttentionMatch) -> list[fx.Node]:
    """Interior nodes of a chain used outside it (the output itself may be used anywhere)."""
    inside = set(m.interior) | {m.output}
    return [n for n in m.interior if any(u not in inside for u in n.users)]


def check_chain(m: AttentionMatch, g: nx.DiGraph) -> str | None:
    """Why the chain cannot be replaced as a unit, or None.

    The chain is safe when no interior node escapes and the inputs q, k, v, mask
    do not depend on the chain (no cycle after the rewrite): the output must
    be the only node through which the chain reaches the rest of the graph.
    """
    esc = escaping_nodes(m)
    if esc:
        names = ", ".join(n.name for n in esc[:3])
        return f"intermediate result(s) {names} of the attention are {ESCAPES}"
    inside = set(m.interior) | {m.output}
    for inp in (m.q, m.k, m.v, m.mask):
        if isinstance(inp, fx.Node) and inp in g and any(a in inside for a in nx.ancestors(g, inp) | {inp}):
            return "an input of the attention depends on the attention itself"
    return None


def site_params(ctx: PassContext, site: str, q_shape=None, k_shape=None) -> TileParams:
    """The plan a site runs with: the context's overrides for it, else the config, with
    tile, near field and anchors chosen from the site's head counts where the config
    leaves them None (`NaniteConfig.tiling`; the shapes are the site's report entry's
    when not given)."""
    cfg = ctx.config
    over = ctx.plans.get(site, {})
    if q_shape is None or k_shape is None:
        rec = next((r for r in ctx.sites if r.site == site), None)
        if rec is not None:
            q_shape, k_shape = rec.q_shape, rec.k_shape
    # a plan's own tile counts the near field and anchors in its tiles, as a set config does
    tiling = cfg if "tile" not in over else dataclasses.replace(cfg, tile=over["tile"])
    tile, window, anchors = tiling.tiling(_heads(q_shape), _heads(k_shape))
    return TileParams(
        tile=tile,
        window=over.get("window", window),
        anchors=over.get("anchors", anchors),
        horizon=over.get("horizon", cfg.horizon),
        budget=over.get("budget", cfg.budget),
        budget_reads=over.get("budget_reads", cfg.budget_reads),
        state_features=over.get("state_features", cfg.state_features),
        sharpness=over.get("sharpness", cfg.sharpness),
        max_level=over.get("max_level", cfg.max_level),
        select=over.get("select", cfg.select),
        row_tiles=over.get("row_tiles", cfg.row_tiles),
    )


def _heads(shape) -> int | None:
    """The head count of a ``[B, H, N, D]`` shape, or ``B*H`` of a 3-D ``[B*H, N, D]`` one
    (the ratio of two such is still the query heads per KV head); None if unknown or
    symbolic."""
    if shape is None or len(shape) not in (3, 4):
        return None
    h = shape[1] if len(shape) == 4 else shape[0]
    return h if isinstance(h, int) else None


def _hinted(shape) -> list | None:
    """The sizes of this graph's example input, symbolic ones by their hint: a graph that
    Dynamo compiled from a frame inside the attention (after a graph break) has symbolic
    head counts, and the tiling chosen from them has to be the one the site's other graphs
    run (reading a hint adds no guard)."""
    if shape is None:
        return None
    out = []
    for s in shape:
        hint = getattr(getattr(s, "node", None), "hint", None) if isinstance(s, torch.SymInt) else s
        out.append(hint if isinstance(hint, int) else str(s))
    return out


def _shape_list(shape) -> list | None:
    if shape is None:
        return None
    # never int() a symbolic size: that would specialise (and recompile) the graph
    return [s if isinstance(s, int) else str(s) for s in shape]


def rewrite_matches(gm: fx.GraphModule, matches: list[AttentionMatch], ctx: PassContext) -> int:
    """Rewrite every match without a skip reason; record every match in ``ctx.sites``.

    Returns:
        The number of rewritten sites.
    """
    g = graph_to_nx(gm.graph)
    rewritten = 0
    for m in matches:
        if m.skip_reason is None:
            m.skip_reason = check_chain(m, g)
        path = m.module_path or ctx.site_prefix
        if ctx.site_prefix and not path.startswith(ctx.site_prefix):
            path = f"{ctx.site_prefix}.{path}" if path else ctx.site_prefix
        # one name per attention site, stable across recompiles of the same code
        same = [o for o in matches if (o.module_path or ctx.site_prefix) == (m.module_path or ctx.site_prefix)]
        site = path or "<root>"
        if len(same) > 1:
            site = f"{site}[{same.index(m)}]"
        q_shape, k_shape = node_shape(m.q), node_shape(m.k)
        params = site_params(ctx, site, _hinted(q_shape), _hinted(k_shape))
        rec = SiteReport(
            site=site,
            module_path=path,
            pattern=m.pattern,
            mask_kind=m.mask_kind,
            q_shape=_shape_list(q_shape),
            k_shape=_shape_list(k_shape),
            status="skipped" if m.skip_reason else "rewritten",
            reason=m.skip_reason or "",
            plan=_plan_dict(params) if not m.skip_reason else {},
        )
        ctx.sites.append(rec)
        if m.skip_reason:
            ctx.count("skipped")
            continue
        _emit(gm, m, params, site, ctx)
        rewritten += 1
        ctx.count("rewritten")
    if rewritten:
        gm.graph.eliminate_dead_code(is_impure_node=_keep_node)
        gm.graph.lint()
        gm.recompile()
    return rewritten


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.setitem}


def _keep_node(node: fx.Node) -> bool:
    """Dead-code elimination must keep in-place calls: Dynamo records ``x.mul_(s)`` as a
    ``call_method`` with no users (``Node.is_impure`` calls it pure), and dropping it
    changes what later reads of ``x`` see."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True
    return node.is_impure()


def plan_args(p: TileParams, seed: int, site: str, impl: str = "auto") -> tuple:
    """The op's scalar arguments after ``is_causal``, in schema order (None as -1 / 0).

    ``site`` is the op's site key: the report name, plus ``@tag`` for a
    conversion whose cost model may later set the site's plan by that key.
    ``impl`` is `NaniteConfig.impl`.
    """
    return (p.tile, p.window, p.anchors, -1 if p.horizon is None else p.horizon, p.budget,
            0 if p.budget_reads is None else p.budget_reads, p.state_features, seed, site,
            p.sharpness, impl, -1 if p.max_level is None else p.max_level, p.select, p.row_tiles)


def _plan_dict(p: TileParams) -> dict:
    return {
        "tile": p.tile, "window": p.window, "anchors": p.anchors, "horizon": p.horizon,
        "budget": p.budget, "budget_reads": p.budget_reads, "state_features": p.state_features,
        "sharpness": p.sharpness, "max_level": p.max_level, "select": p.select,
        "row_tiles": p.row_tiles,
    }


def _emit(gm: fx.GraphModule, m: AttentionMatch, p: TileParams, site: str, ctx: PassContext) -> None:
    graph = gm.graph
    out = m.output
    with graph.inserting_before(out):
        q, k, v, mask = m.q, m.k, m.v, m.mask
        if m.view_4d:
            q, k, v = (graph.call_method("unsqueeze", (t, 0)) for t in (q, k, v))
            if isinstance(mask, fx.Node):
                mask = graph.call_method("unsqueeze", (mask, 0))
        scale = m.scale
        if scale is None:
            d = node_shape(m.q)[-1]
            scale = 1.0 / math.sqrt(int(d))
        new = graph.call_function(
            torch.ops.nanite.tiled_attention.default,
            (q, k, v, mask, scale, bool(m.is_causal), *plan_args(p, ctx.config.seed, site + ctx.site_tag,
                                                               ctx.config.impl)),
        )
        if m.view_4d:
            new = graph.call_method("squeeze", (new, 0))
    new.meta.update({k_: v_ for k_, v_ in out.meta.items() if k_ in ("val", "example_value",
                                                                   "nn_module_stack", "stack_trace")})
    out.replace_all_uses_with(new)
    graph.erase_node(out)
