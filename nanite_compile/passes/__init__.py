"""Graph passes, run in order on each captured FX graph.

Finders read the graph and return attention matches; ``rewrite_matches``
turns the rewritable ones into ``nanite::tiled_attention`` calls and records
every match (rewritten or skipped, with its reason) in the context.
"""

from __future__ import annotations

import torch.fx as fx

from .base import AttentionMatch, PassContext
from .find_sdpa import find_sdpa
from .rewrite import rewrite_matches

FINDERS = [find_sdpa]

try:  # the eager-chain finder lives in its own module
    from .find_eager import find_eager

    FINDERS.append(find_eager)
except ImportError:  # pragma: no cover - during development only
    pass


# higher-order ops whose body runs once, as a function of the op's inputs: an attention in
# the body is rewritten there (activation checkpointing recomputes the same body)
_BODY_OPS = ("tag_activation_checkpoint", "wrap")


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> list[AttentionMatch]:
    """Find every attention in ``gm`` and in the bodies of its checkpoint/wrap
    higher-order ops, and rewrite what can be rewritten."""
    matches = _run(gm, ctx)
    for body in _bodies(gm):
        matches += run_passes(body, ctx)
    return matches


def _bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", None) not in _BODY_OPS \
                or not node.args or getattr(node.args[0], "op", None) != "get_attr":
            continue
        body = getattr(gm, node.args[0].target, None)
        if isinstance(body, fx.GraphModule) and body not in out:
            out.append(body)
    return out


def _run(gm: fx.GraphModule, ctx: PassContext) -> list[AttentionMatch]:
    matches: list[AttentionMatch] = []
    claimed: set = set()
    for finder in FINDERS:
        for m in finder(gm, ctx):
            if m.output in claimed:
                continue
            claimed.add(m.output)
            matches.append(m)
    rewrite_matches(gm, matches, ctx)
    return matches


__all__ = ["AttentionMatch", "PassContext", "run_passes", "FINDERS"]
