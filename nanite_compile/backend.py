"""The ``nanite`` torch.compile backend.

Registered once, through the ``torch_dynamo_backends`` entry point in
pyproject.toml, so ``torch.compile(model, backend="nanite",
options={"budget": 0.25})`` works after ``pip install``. Each captured graph
runs through the passes (find attention, rewrite it); the rest of the graph
goes on to inductor, or runs as captured with ``inner="eager"``.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter

import torch
import torch.fx as fx

from .config import NaniteConfig
from .passes import PassContext, run_passes

_LOCK = threading.Lock()
# parameter id -> site lists of the graphs that took that parameter as input;
# nanite_compile.report(compiled_model) finds its sites through its parameters.
# Entries go away with their parameter.
_BY_TENSOR: dict[int, list[list]] = {}


# (parameter shapes, sites) of recent graphs, for modules whose graph Dynamo reused
_GRAPHS: list[tuple[Counter, list]] = []
_KEEP_GRAPHS = 256


def _forget(key: int) -> None:
    with _LOCK:
        _BY_TENSOR.pop(key, None)


class NaniteBackend:
    """A Dynamo backend instance: one configuration, the sites it rewrote.

    Args:
        config: the configuration (budget, tile parameters, inner compiler).
        site_prefix: module path prepended to site names (used by ``convert``).
        plans: per-site tile parameter overrides.
        inner: overrides ``config.inner``.
        site_tag: appended to site names in the op's ``site`` argument (see
            ``PassContext.site_tag``).
        register: make the sites findable by ``nanite_compile.report`` of the
            compiled model (``convert`` keeps its own record and passes False).
    """

    def __init__(self, config: NaniteConfig | None = None, *, site_prefix: str = "",
                 plans: dict | None = None, inner: str | None = None,
                 register: bool = True, site_tag: str = "") -> None:
        self.register = register
        self.config = config or NaniteConfig()
        self.site_prefix = site_prefix
        self.plans = dict(plans or {})
        self.site_tag = site_tag
        self.inner = inner or self.config.inner
        self.sites: list = []
        self.counters: dict = {}
        self.graphs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs):
        ctx = PassContext(self.config, site_prefix=self.site_prefix, plans=self.plans,
                          graph_index=self.graphs, site_tag=self.site_tag)
        run_passes(gm, ctx)
        if self.inner == "eager":
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            # may raise to restart Dynamo's analysis (e.g. a SymFloat scale reaching the op's
            # float argument); only a graph that compiled is counted
            compiled = compile_fx(gm, example_inputs)
        self.graphs += 1
        self._remember(ctx, example_inputs)
        return compiled

    def context(self) -> PassContext:
        """A pass context carrying this backend's configuration, plans and (a copy of) its
        site records, whose head counts decide a site's tile where the config leaves it
        None (`site_params`)."""
        return PassContext(self.config, site_prefix=self.site_prefix, plans=self.plans,
                           sites=list(self.sites), site_tag=self.site_tag)

    def rewritten_sites(self) -> list:
        return [s for s in self.sites if s.status == "rewritten"]

    def _remember(self, ctx: PassContext, example_inputs) -> None:
        known = {s.site for s in self.sites}
        self.sites.extend(s for s in ctx.sites if s.site not in known)
        for k, v in ctx.counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        if not self.register:
            return
        graph_sites = list(ctx.sites)
        shapes = Counter(tuple(t.shape) for t in example_inputs
                         if isinstance(t, torch.nn.Parameter))
        with _LOCK:
            _GRAPHS.append((shapes, graph_sites))
            del _GRAPHS[:-_KEEP_GRAPHS]
            for t in example_inputs:
                if isinstance(t, torch.nn.Parameter):
                    key = id(t)
                    if key not in _BY_TENSOR:
                        weakref.finalize(t, _forget, key)
                    _BY_TENSOR.setdefault(key, []).append(graph_sites)


def sites_for(module: torch.nn.Module) -> list:
    """Sites of the graphs compiled by the nanite backend for ``module``.

    Graphs are found through ``module``'s parameters. Dynamo reuses a graph
    for a second instance of the same architecture without calling the
    backend again; for such a module the graphs whose parameters match its
    parameter shapes stand in. One entry per site name (the latest).
    """
    found: dict = {}
    seen: set[int] = set()
    params = list(module.parameters())
    with _LOCK:
        for p in params:
            for graph_sites in _BY_TENSOR.get(id(p), []):
                if id(graph_sites) not in seen:
                    seen.add(id(graph_sites))
                    found.update((s.site, s) for s in graph_sites)
        if not found and params:
            have = Counter(tuple(p.shape) for p in params)
            for shapes, graph_sites in _GRAPHS:
                if shapes and not (shapes - have):
                    found.update((s.site, s) for s in graph_sites)
    return list(found.values())


def nanite_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Entry point of ``torch.compile(..., backend="nanite", options={...})``.

    ``options`` are `NaniteConfig` fields; unknown ones raise.
    """
    if kwargs:
        raise TypeError(f"unexpected arguments to the nanite backend: {sorted(kwargs)}")
    backend = NaniteBackend(NaniteConfig.from_options(options))
    return backend(gm, example_inputs)
