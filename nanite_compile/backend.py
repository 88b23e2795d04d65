"""The ``nanite`` torch.compile backend.

Registered once, through the ``torch_dynamo_backends`` entry point in
pyproject.toml, so ``torch.compile(model, backend="nanite",
options={"budget": 0.25})`` works after ``pip install``. Each captured graph
runs through the passes (find attention, rewrite it); the rest of the graph
goes on to inductor, or runs as captured with ``inner="eager"``.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from .config import NaniteConfig
from .passes import PassContext, run_passes
from .report import merge_sites

_LOCK = threading.Lock()
_SEQ = itertools.count()


@dataclass
class _Graph:
    """One compiled graph's site records.

    ``names`` are its parameters' names from the frame Dynamo compiled, which is not
    always the model's root (after a graph break, ``layers.0.q_proj.weight`` for the
    model's ``model.layers.0.q_proj.weight``): they say which prefix its site names lack.
    """

    seq: int
    shapes: Counter
    names: list[str]
    sites: list


# parameter id -> the graphs that took that parameter as input;
# nanite_compile.report(compiled_model) finds its sites through its parameters.
# Entries go away with their parameter.
_BY_TENSOR: dict[int, list[_Graph]] = {}

# recent graphs, for modules whose graph Dynamo reused
_GRAPHS: list[_Graph] = []
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
        names = _param_names(gm, example_inputs) if self.register else []
        run_passes(gm, ctx)
        if self.inner == "eager":
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            # may raise to restart Dynamo's analysis (e.g. a SymFloat scale reaching the op's
            # float argument); only a graph that compiled is counted
            compiled = compile_fx(gm, example_inputs)
        self.graphs += 1
        self._remember(ctx, example_inputs, names)
        return compiled

    def context(self) -> PassContext:
        """A pass context carrying this backend's configuration, plans and (a copy of) its
        site records, whose head counts decide a site's tile where the config leaves it
        None (`site_params`)."""
        return PassContext(self.config, site_prefix=self.site_prefix, plans=self.plans,
                           sites=list(self.sites), site_tag=self.site_tag)

    def rewritten_sites(self) -> list:
        return [s for s in self.sites if s.status == "rewritten"]

    def _remember(self, ctx: PassContext, example_inputs, names: list[str]) -> None:
        params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
        graph_sites = list(ctx.sites)
        # earlier graphs of the same module: this backend's (convert installs one per
        # module), or, for torch.compile's one backend per graph, those that took a
        # parameter of this one
        earlier = list(self.sites) + (
            [s for g in _graphs_sharing(params) for s in g.sites] if self.register else [])
        seen = {(id(s), why) for s in earlier for why in s.exact_variants}
        self.sites[:] = merge_sites(self.sites + graph_sites)
        merged = merge_sites(earlier + graph_sites) if self.register else self.sites
        # this graph's call runs exact where one of its skipped records was a rewritten
        # site's (a skipped site compiled before the rewritten one ran exact earlier)
        mine = {r.reason for r in graph_sites if r.status == "skipped"}
        new = [w for s in merged for w in s.exact_variants if (id(s), w) not in seen and w in mine]
        if new:
            why = new[0]
            # no site name in the text, so Python shows it once however many layers compile
            warnings.warn(
                "nanite_compile: calls like this one run the original attention of a rewritten "
                f"site ({why}); other calls stay tiled, and nanite_compile.report(model) "
                "names the sites",
                stacklevel=2,
            )
        for k, v in ctx.counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        if not self.register:
            return
        with _LOCK:
            graph = _Graph(next(_SEQ), Counter(tuple(t.shape) for t in params), names,
                           graph_sites)
            _GRAPHS.append(graph)
            del _GRAPHS[:-_KEEP_GRAPHS]
            for t in params:
                key = id(t)
                if key not in _BY_TENSOR:
                    weakref.finalize(t, _forget, key)
                _BY_TENSOR.setdefault(key, []).append(graph)


def _param_names(gm: fx.GraphModule, example_inputs) -> list[str]:
    """Dotted names of the graph's parameter inputs, from the frame Dynamo compiled."""
    from .passes.base import _clean_path

    names = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, t in zip(placeholders, example_inputs, strict=False):
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if isinstance(t, torch.nn.Parameter) and isinstance(name, str) and \
                name.startswith("L['self']"):
            names.append(_clean_path(name).replace("_parameters.", ""))
    return names


def _graphs_sharing(params: list) -> list[_Graph]:
    """The registered graphs that took one of ``params``, oldest first."""
    graphs: dict[int, _Graph] = {}
    with _LOCK:
        for p in params:
            for g in _BY_TENSOR.get(id(p), []):
                graphs[g.seq] = g
    return [graphs[seq] for seq in sorted(graphs)]


def _full_names(graph: _Graph, have: set[str]) -> list:
    """The graph's site records named from the module's root: the prefix that turns
    every one of the graph's parameter names into a name in ``have`` goes before
    its site names (copies; the records themselves when no prefix, or no single one,
    fits)."""
    if not graph.names:
        return graph.sites
    first = graph.names[0]
    prefixes = {n[: -len(first)] for n in have if n == first or n.endswith("." + first)}
    prefixes = {p for p in prefixes if all(p + n in have for n in graph.names)}
    if len(prefixes) != 1 or prefixes == {""}:
        return graph.sites
    (pre,) = prefixes
    return [replace(s, site=pre + s.site, module_path=pre + s.module_path,
                    exact_variants=list(s.exact_variants)) for s in graph.sites]


def sites_for(module: torch.nn.Module, *, by_shape: bool = True) -> list | None:
    """Sites of the graphs compiled by the nanite backend for ``module``, or None when
    no such graph was found.

    Graphs are found through ``module``'s parameters. Dynamo reuses a graph
    for a second instance of the same architecture without calling the
    backend again; for such a module (``by_shape``: one known to be compiled) the
    graphs whose parameters match its parameter shapes stand in. One entry per
    site (`report.merge_sites`).
    """
    named = dict(module.named_parameters(remove_duplicate=False))  # tied ones by each name
    graphs = _graphs_sharing(list(named.values()))
    if not graphs and named and by_shape:
        have = Counter(tuple(p.shape) for p in named.values())
        with _LOCK:
            graphs = [g for g in _GRAPHS if g.shapes and not (g.shapes - have)]
    if not graphs:
        return None
    return merge_sites(s for g in graphs for s in _full_names(g, set(named)))


def compiled_with_nanite(model) -> bool | None:
    """Whether a ``torch.compile``'d module runs this backend: True, False (another
    backend), or None (not such a module, or Dynamo's wrappers read differently)."""
    hop = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    named = False
    for _ in range(8):  # CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug -> ...
        if hop is None:
            break
        name = getattr(hop, "__name__", None)
        fn = getattr(hop, "compiler_fn", None)
        if name == "nanite" or fn is nanite_backend or isinstance(hop, NaniteBackend) \
                or isinstance(fn, NaniteBackend):
            return True
        named = named or isinstance(name, str)
        hop = getattr(hop, "_torchdynamo_orig_backend", None)
    return False if named else None


def nanite_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Entry point of ``torch.compile(..., backend="nanite", options={...})``.

    ``options`` are `NaniteConfig` fields; unknown ones raise.
    """
    if kwargs:
        raise TypeError(f"unexpected arguments to the nanite backend: {sorted(kwargs)}")
    backend = NaniteBackend(NaniteConfig.from_options(options))
    return backend(gm, example_inputs)
