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


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> list[AttentionMatch]:
    """Find every attention in ``gm`` and rewrite what can be rewritten."""
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
