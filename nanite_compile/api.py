"""The public entry points: ``convert`` and ``report``.

``convert`` works on a copy of the model that shares its parameters:

1. *discover*: one forward on a probe input (the calibration tokens, or a
   synthetic input for a Hugging Face model) records which modules call
   attention-like functions (SDPA, softmax, multi-head attention);
2. *capture and rewrite*: each such module's ``forward`` is captured by
   TorchDynamo (dynamic shapes, so a new length does not recompile) and the
   ``nanite`` passes rewrite every attention they can prove safe into the
   tiled operator; the rest of the captured code runs as captured;
3. *measure*: a second probe forward records, per site, which path ran, key
   reads against the original and the error against exact attention.

The copy keeps the model's class, ``state_dict`` and methods (``generate``).
Without a probe input (a plain module and no calibration), discovery runs on
the first real forward.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .backend import NaniteBackend, compiled_with_nanite, sites_for
from .config import NaniteConfig, check_budget
from .kernels import ops as _ops
from .kernels.masks import MaskStructure
from .kernels.ops import recording
from .passes.rewrite import ESCAPES
from .report import RewriteReport

_UNSET: Any = object()
_PROBE_TOKENS = 1024  # the probe that measures each site
_CAPTURE_TOKENS = 160  # the probe that finds and captures the sites
_MAX_LIFTS = 3  # how many levels up a capture may move to keep attention weights inside
_CALIBRATION_SAMPLES = 4  # input samples per site the cost model measures ...
_PLAN_QUERIES = 8192  # ... until this many queries (per batch row) are covered
# the end-to-end sweep runs only if the cheapest plan leaves at least this share of the
# budget to move between sites (SmolLM2 on 4096-token sequences: 60% at budget 0.25, where
# the plan pays; 2.6% at 0.1, where it did not)
_MIN_HEADROOM = 0.05
_CONVERSIONS = itertools.count()

# functions whose caller is an attention candidate
_ATTENTION_FUNCS = {
    F.scaled_dot_product_attention,
    F.multi_head_attention_forward,
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    torch._native_multi_head_attention,
}


@dataclass
class _NaniteState:
    """What convert attached to the converted model (not part of its state_dict)."""

    config: NaniteConfig
    backends: dict = field(default_factory=dict)  # module path -> NaniteBackend
    installed: list = field(default_factory=list)  # module paths with a captured forward
    pending: bool = False
    notes: list = field(default_factory=list)
    records: dict = field(default_factory=dict)
    tag: str = ""  # appended to site names in the op calls of this conversion
    plan: Any = None  # the cost model's planner.Plan, after calibration

    def __reduce_ex__(self, protocol):
        # the captured forwards are closures pickle cannot keep: torch.save(converted)
        # gave back the original model that still reported itself converted
        raise TypeError(
            "a converted model cannot be pickled (torch.save(model) would give back the "
            "original attention under a report that says otherwise): save it with "
            "nanite_compile.save(model, directory) (safetensors and JSON) and load it with "
            "nanite_compile.load(directory, model)")

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in vars(self).items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"convert() takes a torch.nn.Module, got {type(model).__name__}; for a plain "
            "function use torch.compile(fn, backend='nanite')"
        )


def _resolve_config(budget: Any, config: Any) -> NaniteConfig:
    if config is None:
        cfg = NaniteConfig()
    elif isinstance(config, NaniteConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = NaniteConfig.from_options(config)
    else:
        raise TypeError(
            f"config must be a NaniteConfig or a dict of its options, got {type(config).__name__}"
        )
    if budget is not _UNSET:
        cfg = cfg.replace(budget=check_budget(budget))
    return cfg


def _share_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` sharing every parameter and buffer."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    state = model.__dict__.get("_nanite_state")
    for mod in model.modules():
        if "forward" in mod.__dict__ and state is not None:
            memo[id(mod.__dict__["forward"])] = None  # drop a previous conversion's capture
    if state is not None:
        memo[id(state)] = None
    new = copy.deepcopy(model, memo)
    for mod in new.modules():
        if mod.__dict__.get("forward", 0) is None:
            del mod.__dict__["forward"]
    new.__dict__.pop("_nanite_state", None)
    return new


def _calibration_batches(calibration: Any) -> list[torch.Tensor] | None:
    """The calibration input as a list of ``[B, N]`` tensors (an iterable is read once).

    A tokenizer's output (a mapping with ``input_ids``, such as ``tokenizer(texts,
    padding=True, return_tensors="pt")``) is read as its ``input_ids``; where its
    ``attention_mask`` marks padding, each row's real tokens become a sequence of their
    own (padding ids would otherwise be calibrated on as text)."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, Mapping)):
        items = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = list(calibration)
    else:
        raise TypeError(
            "calibration must be a LongTensor [B, N] of token ids, a tokenizer's output "
            f"(return_tensors='pt'), or an iterable of them, got {type(calibration).__name__}"
        )
    if not items:
        raise ValueError("calibration is empty: pass token ids [B, N] (e.g. a tokenised text)")
    out = []
    for t in items:
        if isinstance(t, Mapping):
            out.extend(_encoding_rows(t))
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"calibration must hold tensors of token ids, got {type(t).__name__}")
        if t.dim() == 1:
            t = t[None]
        if t.dim() == 0 or t.numel() == 0:
            raise ValueError(
                f"calibration tensors must be model inputs with a batch axis (token ids [B, N]), "
                f"got shape {tuple(t.shape)}"
            )
        out.append(t)
    return out


def _encoding_rows(enc: Mapping) -> list[torch.Tensor]:
    """A tokenizer's output as calibration tensors: its ``input_ids`` whole when nothing is
    padding, else each row's unpadded tokens as one ``[1, n]`` sequence."""
    ids = enc.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        what = ("has no 'input_ids'" if ids is None else
                f"holds 'input_ids' as {type(ids).__name__}, not a tensor")
        raise TypeError(
            f"calibration mapping {what} (keys: {sorted(map(str, enc))}); pass a tokenizer's "
            f"output with return_tensors='pt', or the token ids [B, N] themselves")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(f"calibration 'input_ids' must be token ids [B, N], got shape "
                         f"{tuple(ids.shape)} of {ids.dtype}")
    mask = enc.get("attention_mask")
    if mask is None:
        return [ids]
    mask = torch.as_tensor(mask).reshape(ids.shape).bool()
    if bool(mask.all()):
        return [ids]
    rows = []
    for i in range(ids.shape[0]):
        where = mask[i].nonzero().flatten()
        if where.numel() == 0:
            continue  # a row of padding only
        first, last = int(where[0]), int(where[-1])
        if where.numel() != last - first + 1:
            raise ValueError(
                f"calibration row {i}'s attention_mask has gaps (positions {first}..{last} "
                f"hold {where.numel()} real tokens): only padding before or after a row's "
                f"tokens can be removed; pass the rows as separate token-id tensors")
        rows.append(ids[i:i + 1, first:last + 1])
    if not rows:
        raise ValueError("calibration is empty: every row's attention_mask is 0 (all padding)")
    return rows


def _refused(model: nn.Module, what: str, t: torch.Tensor, e: Exception) -> ValueError:
    """The error for calibration the model's forward refused (raised ``from e``)."""
    name = getattr(model, "main_input_name", None)
    return ValueError(
        f"the model's forward failed on {what} (shape {tuple(t.shape)}, {t.dtype}): "
        f"{type(e).__name__}: {e}; calibration must be inputs {type(model).__name__} takes"
        + (f" as {name} (token ids [B, N] within its vocabulary)" if name else ""))


def _token_inputs(model: nn.Module, name: str, ids: torch.Tensor) -> dict:
    """Keyword inputs of a forward on token ids: ``{name: ids}``, and for an
    encoder-decoder (T5) the same tokens as ``decoder_input_ids``, without which its
    forward refuses to run."""
    kwargs = {name: ids}
    cfg = getattr(model, "config", None)
    if name == "input_ids" and getattr(cfg, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    return kwargs


def _probe_inputs(model: nn.Module, calibration: list[torch.Tensor] | None) -> tuple[tuple, dict] | None:
    """Arguments for a probe forward, or None when none can be made up."""
    if calibration is not None:
        first = calibration[0]
        name = getattr(model, "main_input_name", None)
        return ((), _token_inputs(model, name, first[:1])) if name else ((first[:1],), {})
    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if cfg is None or name is None:
        return None
    dev = next(iter(model.parameters()), torch.empty(0)).device
    if name == "input_ids":
        vocab = getattr(cfg, "vocab_size", None)
        if vocab is None and hasattr(cfg, "get_text_config"):
            vocab = getattr(cfg.get_text_config(), "vocab_size", None)
        limit = _context_limit(model)
        n = min(_PROBE_TOKENS, limit) if limit else _PROBE_TOKENS
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(vocab or 100), (1, n), generator=g).to(dev)
        return (), _token_inputs(model, name, ids)
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        ch = getattr(cfg, "num_channels", 3)
        g = torch.Generator().manual_seed(0)
        return (), {"pixel_values": torch.randn(1, ch, size, size, generator=g).to(dev)}
    return None


def _context_limit(model: nn.Module) -> int | None:
    """The most tokens a Hugging Face model takes: its configured positions
    (``max_position_embeddings``, ``n_positions``, ``max_seq_len``), less the offset of
    a learned position table that starts after a padding index (RoBERTa: 514 - 2), or
    None without such a setting."""
    cfg = getattr(model, "config", None)
    limit = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = limit or getattr(cfg, attr, None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    offset = max((m.padding_idx + 1 for m in model.modules()
                  if isinstance(m, nn.Embedding) and m.num_embeddings == limit
                  and m.padding_idx is not None), default=0)
    return max(1, limit - offset)


def _shortened(probe: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The probe cut to ``_CAPTURE_TOKENS`` tokens for discovery and capture.

    Shapes are captured dynamic, so the short probe compiles the same graphs as
    the long one at a fraction of the forward cost; the long probe then measures.
    """
    args, kwargs = probe
    for key in ("input_ids", "decoder_input_ids"):
        ids = kwargs.get(key)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > _CAPTURE_TOKENS:
            kwargs = dict(kwargs, **{key: ids[:, :_CAPTURE_TOKENS]})
    return args, kwargs


class _Discover(TorchFunctionMode):
    """Records the innermost module that called an attention-like function."""

    def __init__(self, stack: list) -> None:
        super().__init__()
        self.stack = stack
        self.owners: dict[int, nn.Module] = {}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func in _ATTENTION_FUNCS and self.stack:
            owner = self.stack[-1]
            self.owners.setdefault(id(owner), owner)
        return func(*args, **(kwargs or {}))


def _discover(model: nn.Module, args: tuple, kwargs: dict) -> list[nn.Module]:
    stack: list[nn.Module] = []
    handles = []

    def enter(mod, args):
        stack.append(mod)

    def leave(mod, args, out):
        stack.pop()

    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(leave, always_call=True))
    mode = _Discover(stack)
    try:
        with torch.no_grad(), _mha_fastpath_off(), mode:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return list(mode.owners.values())


class _mha_fastpath_off:
    """Route nn.MultiheadAttention / TransformerEncoderLayer through their traceable path."""

    def __enter__(self):
        self.prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.prev)


def _fresh_function(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` with its own code object, so Dynamo caches it per module."""
    new = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                             fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    return new


class _SDPAToNanite(TorchFunctionMode):
    """Send a module's SDPA calls to the tiled op while another compiler traces it."""

    def __init__(self, backend: NaniteBackend) -> None:
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = _sdpa_as_nanite(self.backend, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _sdpa_as_nanite(backend: NaniteBackend, args: tuple, kwargs: dict):
    from .kernels import ops  # noqa: F401  (registers the op)
    from .passes.find_sdpa import _SDPA_ARGS, _SDPA_DEFAULTS
    from .passes.rewrite import plan_args, site_params

    a = dict(_SDPA_DEFAULTS)
    a.update(zip(_SDPA_ARGS, args, strict=False))  # args may stop early
    a.update(kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if a["dropout_p"] or q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1]:
        return None
    if a["is_causal"] and a["attn_mask"] is not None:
        return None
    sites = [s for s in backend.sites if s.status == "rewritten" and s.pattern == "sdpa"]
    if not sites:
        return None
    p = site_params(backend.context(), sites[0].site)
    scale = a["scale"] if a["scale"] is not None else q.shape[-1] ** -0.5
    return torch.ops.nanite.tiled_attention(
        q, k, v, a["attn_mask"], scale, bool(a["is_causal"]),
        *plan_args(p, backend.config.seed, sites[0].site + backend.site_tag, backend.config.impl),
    )


# compiled variants a rewritten site keeps (Dynamo's default is 8 per code object)
_RECOMPILE_LIMIT = 64


def _install(module: nn.Module, backend: NaniteBackend) -> None:
    fwd = module.forward
    fn = fwd.__func__ if isinstance(fwd, types.MethodType) else type(module).forward
    compiled = torch.compile(_fresh_function(fn), backend=backend, dynamic=True)

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # Someone else is tracing the converted model (torch.compile or
            # export of it): the captured rewrite is invisible to that trace,
            # so SDPA calls are sent to the tiled op as they are traced.
            if any(s.pattern != "sdpa" for s in backend.rewritten_sites()):
                _warn_outer_trace(backend)
            with _SDPAToNanite(backend):
                return fn(self, *args, **kwargs)
        # each call signature (batch 1 or more, prefill or decode, each cache kind, kwargs)
        # is one compiled variant of this site; past Dynamo's limit a new one would run
        # the original attention, silently (five generate() variants reached 8)
        # (set and restored by hand: config.patch costs 120 us a call, 4% of a decode step)
        # Python floats (a softmax scale, a dropout probability) are graph constants:
        # with Dynamo's dynamic=True they are run-time values, which activation
        # checkpointing hands its body as tensors no finder can prove constant
        cfg = torch._dynamo.config
        before = cfg.recompile_limit, cfg.specialize_float
        cfg.recompile_limit = max(before[0], _RECOMPILE_LIMIT)
        cfg.specialize_float = True
        collector = _hf_collector()
        try:
            if collector is None:
                return compiled(self, *args, **kwargs)
            with collector:
                return compiled(self, *args, **kwargs)
        finally:
            cfg.recompile_limit, cfg.specialize_float = before

    forward.__wrapped__ = fn
    module.forward = types.MethodType(forward, module)


class _TracedCollector:
    """transformers' output collector (``output_capturing._active_collector``, a context
    variable its forward hooks read), in the mode transformers uses under torch.compile.

    After one ``output_attentions=True`` or ``output_hidden_states=True`` call,
    transformers leaves output-capturing hooks on the attention modules. A captured
    module (an eager attention's decoder layer) traces them, and Dynamo cannot trace
    ``ContextVar.get``: the graph broke in the hook, the attention weights crossed the
    break, and every call signature compiled afterwards ran the original attention.
    Read as a plain attribute for the call, the hook is a no-op when nothing is
    collected (tiled) and collects when asked (then the weights escape: exact).
    """

    def __init__(self, var) -> None:
        self.var = var

    def __enter__(self):
        self.saved = self.var.compiling, self.var.global_var
        self.var.global_var = self.var.get()
        self.var.compiling = True

    def __exit__(self, *exc):
        self.var.compiling, self.var.global_var = self.saved


def _hf_collector() -> _TracedCollector | None:
    mod = sys.modules.get("transformers.utils.output_capturing")
    var = getattr(mod, "_active_collector", None)
    if var is None or getattr(var, "compiling", True) or not hasattr(var, "global_var"):
        return None  # not loaded, another version, or a compile of transformers' own
    return _TracedCollector(var)


def _warn_outer_trace(backend: NaniteBackend) -> None:
    import warnings

    warnings.warn(
        f"nanite_compile: under an outer torch.compile/export, the hand-written attention at "
        f"{backend.site_prefix or '<root>'} runs exact; compile the original model with "
        "backend='nanite' to rewrite it in that graph",
        stacklevel=3,
    )


def _wrap_root_fastpath(model: nn.Module) -> None:
    """Run the model's forward with the MHA fast path off (it bypasses the capture)."""
    fwd = model.forward
    fn = fwd.__func__ if isinstance(fwd, types.MethodType) else type(model).forward

    def forward(self, *args, **kwargs):
        with _mha_fastpath_off():
            return fn(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


def _install_at(converted: nn.Module, state: _NaniteState, path: str) -> None:
    module = converted.get_submodule(path) if path else converted
    backend = NaniteBackend(state.config, site_prefix=path, inner="eager", register=False,
                            site_tag=state.tag)
    state.backends[path] = backend
    _install(module, backend)
    state.installed.append(path)


def _uninstall(converted: nn.Module, state: _NaniteState, path: str) -> None:
    module = converted.get_submodule(path) if path else converted
    module.__dict__.pop("forward", None)
    state.installed.remove(path)
    del state.backends[path]


def _parent(converted: nn.Module, path: str) -> str | None:
    """The nearest enclosing module that runs a forward of its own (not a ModuleList/Dict)."""
    while path:
        path = path.rpartition(".")[0]
        mod = converted.get_submodule(path) if path else converted
        if not isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and \
                type(mod).forward is not nn.Module.forward:
            return path
    return None


def _capture(converted: nn.Module, state: _NaniteState, args: tuple, kwargs: dict) -> None:
    """Discover attention owners on ``args``, capture them, and settle where to capture.

    A module that hands its attention weights to its caller (Hugging Face eager
    attention returns ``(output, weights)``) cannot be rewritten on its own:
    the weights escape. A caller up the chain usually drops them, so such a
    module's capture moves up (at most ``_MAX_LIFTS`` levels) to where the
    escape check sees them unused.
    """
    owners = _discover(converted, args, kwargs)
    paths = {id(m): n for n, m in converted.named_modules()}
    for owner in owners:
        _install_at(converted, state, paths.get(id(owner), ""))
    if any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in owners):
        _wrap_root_fastpath(converted)
    lifted: dict[str, str] = {}  # lifted capture -> the module it was lifted from
    for round_ in range(_MAX_LIFTS + 1):
        with torch.no_grad():
            converted(*args, **kwargs)  # compiles every newly captured module
        moved = False
        for path in list(state.installed):
            backend = state.backends.get(path)
            if backend is None:  # removed in this round (inside a lifted capture)
                continue
            if not backend.sites:
                _uninstall(converted, state, path)
                if path in lifted:  # the lift lost the site: capture the child again, as it was
                    _install_at(converted, state, lifted.pop(path))
                    moved = True
                # otherwise a softmax that is no attention: the module is given back
                continue
            escaped = any(s.status == "skipped" and ESCAPES in s.reason for s in backend.sites)
            parent = _parent(converted, path)
            if (escaped and parent is not None and parent not in state.installed
                    and round_ < _MAX_LIFTS and path not in lifted.values()):
                _uninstall(converted, state, path)
                for inner in [q for q in state.installed if q.startswith(parent + ".") or not parent]:
                    _uninstall(converted, state, inner)  # traced inside the parent's capture
                _install_at(converted, state, parent)
                lifted[parent] = path
                moved = True
        if not moved:
            break
    if moved:
        with torch.no_grad():
            converted(*args, **kwargs)


def _measure(converted: nn.Module, state: _NaniteState, args: tuple, kwargs: dict) -> None:
    with torch.no_grad(), recording(measure_error=True) as rec:
        converted(*args, **kwargs)
    state.records = rec
    sites = []
    for path in state.installed:
        for site in state.backends[path].sites:
            site.absorb(rec.get(site.site, []))
            sites.append(site)
    for note in (_over_budget_note(sites), _computed_note(sites)):
        if note:
            state.notes.append(note)


# a site whose reads exceed its budget by more than this (relative) gets named in a note
_OVER_BUDGET_SLACK = 0.05


def _over_budget_note(sites: list) -> str | None:
    """A note when tiled sites read more than their budget on the measured input.

    Every query is allowed at least its own tile, the near field, the anchor tiles and
    one read per older tile (at most the state's width), whatever the budget
    (`levels._allowance`); on a short input that floor alone can exceed it. The user
    asked for a fraction and should see that they did not get it, and why.
    """
    over = []
    for s in sites:
        plan = s.plan or {}
        if s.runtime_path != "tiled" or plan.get("budget_reads") is not None:
            continue
        budget = plan.get("budget")
        ratio = s.read_ratio
        if not budget or budget >= 1.0 or ratio is None:
            continue
        if ratio > budget * (1.0 + _OVER_BUDGET_SLACK):
            over.append((ratio, budget, s))
    if not over:
        return None
    ratio, budget, worst = max(over, key=lambda t: t[0] / t[1])
    plan = worst.plan
    n = (worst.measured_shape or [None, None, "?"])[2]
    head = (f"{len(over)} tiled site(s) read more than their budget on the measured input "
            f"({n} tokens): {worst.site} reads x{ratio:.3f} of the original at budget "
            f"{budget:g}. ")
    sliding = MaskStructure.window_of(worst.runtime_mask)
    if sliding is not None:
        # the original reads a window per query at any length; the tiles it straddles are
        # read whole, so a longer input does not help
        return head + (
            f"Its sliding window ({sliding} tokens) is read as the whole tiles of "
            f"{plan.get('tile')} it straddles, at any input length: a smaller tile brings "
            "the reads closer to the window (SDPA given a mask scores the masked keys too, "
            "so the tiled site still computes less than the original)")
    return head + (
        f"Every query is allowed at least its own tile, the near field ({plan.get('window')} "
        f"tiles of {plan.get('tile')}), {plan.get('anchors')} anchor tile(s) and one read per "
        "older tile, whatever the budget; longer inputs, or a smaller window, anchors or "
        "tile, bring the reads down to the budget")


def _computed_note(sites: list) -> str | None:
    """A note when sites compute more than they read (``select="query"``): the budget
    bounds each query's reads, and the FLOPs in the summary are the larger number."""
    more = [s for s in sites if s.computed_per_query is not None and s.exact_reads_per_query]
    if not more:
        return None
    exact = sum(s.exact_reads_per_query for s in more)
    reads = sum(s.reads_per_query for s in more) / exact
    work = sum(s.computed_per_query for s in more) / exact
    return (
        f"{len(more)} site(s) choose their tiles per query (select='query'): each query reads "
        f"x{reads:.3f} of the original keys, but a query tile scores the union of its queries' "
        f"tiles, x{work:.3f} of the original attention work (the FLOPs above count it); "
        "select='row' computes what it reads")


def _capture_on_first_call(converted: nn.Module, state: _NaniteState,
                           plans: dict | None = None) -> None:
    """Without a probe input, capture on the first forward (before it runs);
    ``plans`` (saved ones) are applied right after the capture."""
    fwd = converted.forward
    fn = fwd.__func__ if isinstance(fwd, types.MethodType) else type(converted).forward

    def forward(self, *args, **kwargs):
        self.__dict__.pop("forward", None)
        state.pending = False
        state.notes.clear()
        _capture(self, state, args, kwargs)
        if plans:
            _apply_plans(state, plans)
        return self.forward(*args, **kwargs)

    forward.__wrapped__ = fn
    converted.forward = types.MethodType(forward, converted)


def _site_index(state: _NaniteState) -> dict:
    """Rewritten site name -> (backend, its SiteReport)."""
    return {s.site: (be, s) for be in state.backends.values() for s in be.sites
            if s.status == "rewritten"}


def _apply_plans(state: _NaniteState, plans: dict[str, dict]) -> None:
    """Run each named site with its plan dict (cost model output or a saved plan)."""
    from .passes.rewrite import site_params

    index = _site_index(state)
    keys = []
    for site, entries in plans.items():
        if site not in index:
            continue
        backend, rep = index[site]
        backend.plans[site] = dict(entries)
        params = site_params(backend.context(), site)
        _ops.set_site_plans({site + state.tag: params})
        keys.append(site + state.tag)
        rep.plan = dict(rep.plan, **entries)
    weakref.finalize(state, _ops.drop_site_plans, keys)


def _calibrate(converted: nn.Module, state: _NaniteState, batches: list[torch.Tensor],
               given: list[torch.Tensor]) -> None:
    """The cost model: collect each site's inputs on the calibration tokens, plan, apply.
    ``batches`` are the calibration as it is planned on (`_cut`), ``given`` as passed."""
    from . import planner
    from .passes.rewrite import site_params

    name = getattr(converted, "main_input_name", None)
    index = _site_index(state)
    by_model = state.config.objective == "model"
    used = 0
    with torch.no_grad(), _ops.collecting(max_calls=_CALIBRATION_SAMPLES) as got:
        for i, ids in enumerate(_progress(batches, "nanite: calibration forwards")):
            try:
                if name:
                    converted(**_token_inputs(converted, name, ids))
                else:
                    converted(ids)
            except (IndexError, RuntimeError, TypeError, ValueError) as e:
                raise _refused(converted, f"calibration piece {i}", ids, e) from e
            used += 1
            # the cost model measures each site on its first samples up to _PLAN_QUERIES
            # queries (`_enough`): once every site called has them, later batches would
            # be collected and dropped (SmolLM2 on 4 x 4096 tokens: two forwards, ~25 s)
            sites = [v for s, v in got.items() if s in index]
            if sites and all(_covered(v) for v in sites):
                break
    collected = {s: _enough(v) for s, v in got.items() if s in index}
    if not collected:
        state.notes.append("calibration: no rewritten site was called; plans left uniform")
        return
    ladder = _model_candidates(state.config.budget) if by_model else planner.LADDER
    bar = _progress(None, "nanite: cost model", total=len(collected))
    plan, curves = planner.plan_sites(
        collected, lambda s: site_params(index[s][0].context(), s), state.config.budget,
        seed=state.config.seed, max_error=state.config.max_error, ladder=ladder,
        progress=(lambda s: bar.update(1)) if bar is not None else None,
    )
    if bar is not None:
        bar.close()
    ntok = _calibration_size(batches, used, given,
                             state.config.plan_tokens if by_model else None)
    # the sweep (two forwards a site) needs room to move reads between sites
    headroom = _MIN_HEADROOM if by_model else -1e-6
    if plan.floor > plan.budget * (1.0 - headroom):
        # The cheapest candidates read more than the budget at this calibration length
        # (near field, anchors, one summary or the state a row), and a candidate is
        # labelled with the share it spent, so the plan would spend that larger share at
        # every length (SmolLM2, 2048 calibration tokens, budget 0.1: 0.171 of the
        # original at 8192 tokens); the uniform budget spends the budget on inputs long
        # enough for it. Or they read nearly the budget, and no site can give another
        # more than a few hundredths of its reads: the sweep would buy a plan equal to
        # the uniform one up to noise (SmolLM2, budget 0.1 on 4096-token sequences: the
        # cheapest plan read x0.0974; the swept plan, 442 s, moved 2.6% of the reads and
        # raised the calibration loss, 3.6207 against 3.6198, and Hamlet's [4k, 8k)
        # from 23.979 to 24.056).
        where = ("above the budget" if plan.floor > plan.budget * (1.0 + 1e-6) else
                 f"within {_MIN_HEADROOM:.0%} of the budget, so no site can give another a "
                 f"useful share of its reads")
        state.notes.append(
            f"cost model: not used, every site keeps budget {state.config.budget:g}: on these "
            f"calibration sequences ({ntok}) the cheapest plan reads x{plan.floor:.3f} of the "
            f"original, {where} (the near field, anchors and summaries every row reads); "
            f"calibrate on longer sequences (with plan_tokens at least their length) to plan "
            f"this budget per site")
        return
    sweep_note = ""
    if by_model and curves:
        sw = _model_sweep(converted, state, batches[0], [c.site for c in curves], ladder)
        nominal = planner.candidate_budgets(ladder)
        for c in curves:
            # exact is not swept (a third more forwards for a candidate SmolLM2's plans
            # took once in 30 layers, where 2.5x the budget did as well): it stays out
            # of the plan unless max_error keeps a site exact
            c.costs = [sw.costs[c.site].get(b, math.inf) for b in nominal]
        plan = planner.allocate(curves, state.config.budget, state.config.max_error)
        what = "next-token KL" if sw.kind == "kl" else "relative output error"
        sweep_note = (f"; planned by each site's effect on the model's output ({what} against "
                      f"the original on {sw.tokens} tokens: uniform {sw.base:.4g}, the plan's "
                      f"summed change {sum(p.model_cost or 0.0 for p in plan.sites.values()):+.4g};"
                      f" {sw.forwards} forwards{', blocks replayed' if sw.replayed else ''}, "
                      f"{sw.seconds:.0f} s)")
    entries = {s: p.to_plan_entries() for s, p in plan.sites.items()}
    # Neither objective is the model's loss: the sites' own errors do not track it (at
    # budget 0.1 on SmolLM2 that plan raised perplexity from x1.23 to x1.42), and the
    # end-to-end costs are measured one site at a time and summed, while the sites'
    # errors compound. Keep the plan only if the first calibration batch's next-token
    # loss is no worse than with every site at the uniform budget.
    nll_uniform = _calibration_nll(converted, batches[0]) if state.config.plan_check else None
    before = {s: dict(index[s][1].plan) for s in entries if s in index}
    _apply_plans(state, entries)
    nll_plan = _calibration_nll(converted, batches[0]) if nll_uniform is not None else None
    if nll_plan is not None and nll_plan > nll_uniform:
        _undo_plans(state, before)
        state.notes.append(
            f"cost model: plan rejected, every site keeps budget {state.config.budget:g}: its "
            f"next-token loss on the first calibration batch was {nll_plan:.4f} against "
            f"{nll_uniform:.4f} with the uniform budget ({ntok})")
        return
    state.plan = plan
    exact = [s for s, p in plan.sites.items() if p.kept_exact]
    loss = ("" if nll_plan is None else
            f"; calibration loss {nll_plan:.4f} (uniform budget: {nll_uniform:.4f})")
    state.notes.append(
        f"cost model: {len(plan.sites)} sites planned on {ntok}; reads "
        f"x{plan.realised:.3f} of the original (budget {plan.budget:g})"
        + (f"; kept exact by max_error: {', '.join(exact)}" if exact else "") + sweep_note + loss
    )


def _calibration_size(batches: list[torch.Tensor], used: int | None = None,
                      given: list[torch.Tensor] | None = None, plan_tokens: int | None = None) -> str:
    """How much calibration there was, in words: tokens for token ids, else inputs; with
    ``used``, how much of it the first ``used`` batches held when that is less; with
    ``given`` (the calibration before `_cut`), what the cut did to it, and why: pieces of
    ``plan_tokens``, else the model's position table."""
    tokens = all(b.dim() == 2 and not b.is_floating_point() for b in batches)

    def size(bs: list[torch.Tensor]) -> int:
        return sum(int(b.numel() if tokens else b.shape[0]) for b in bs)

    def longest(bs: list[torch.Tensor]) -> int:
        return max(int(b.shape[-1]) for b in bs)

    what = "calibration tokens" if tokens else "calibration inputs"
    part = "" if used is None or used >= len(batches) else f"the first {size(batches[:used])} of "
    out = f"{part}{size(batches)} {what}"
    if not tokens:
        return out
    out += f", the longest sequence {longest(batches)}"
    if given and longest(given) > longest(batches):
        left = size(given) - size(batches)
        why = ("plan_tokens" if longest(batches) == plan_tokens else
               "the model's position table")
        out += (f", cut from sequences of up to {longest(given)} ({why}"
                + (f"; the {left} past the last whole piece unused" if left else "") + ")")
    return out


def _cut(batches: list[torch.Tensor], length: int | None) -> list[torch.Tensor]:
    """Token-id batches ``[B, N]`` longer than ``length`` as consecutive pieces of exactly
    ``length`` tokens, in order (the ``N mod length`` tokens after the last whole piece
    are left out); anything else as it is.

    The end-to-end sweep labels each candidate with the reads it realised on the
    collected sequences, and those depend on the length (near field, anchors and
    summaries are a larger share of a short row), so the sweep, the read measurement and
    the loss check must see one length. SmolLM2 calibrated on 2 x 8192 tokens at budget
    0.1, swept on the first 4096 and measured at 8192: the plan raised the calibration
    loss (3.3864 against 3.3268 uniform) and was rejected after 553 s; cut to 4096 the
    cheapest plan fills the budget and no sweep runs. Swept on 2048 of 4096 tokens at
    0.25 the plan was rejected too (3.2686 against 3.2279); at 4096 it lowered it. A
    shorter last piece would be measured at yet another length (a 1-token piece after
    384 tokens made a tiny model's cheapest plan read x1.000), so it is not kept.
    """
    if length is None:
        return batches
    out = []
    for b in batches:
        if b.dim() == 2 and not b.is_floating_point() and b.shape[1] > length:
            whole = b.shape[1] // length * length
            out.extend(b[:, :whole].split(length, dim=1))
        else:
            out.append(b)
    return out


def _model_candidates(budget: float) -> tuple[float, ...]:
    """The budgets the end-to-end sweep tries a site at, around the uniform ``budget``:
    0.4x, 1x and 2.5x it (`planner.measure_site` adds exact, which the sweep skips). On SmolLM2
    at 0.25 (Hamlet, one layer changed at a time) the cheap layers were flat down to 0.1
    and the layers that paid gained most between 0.25 and 0.6-1.0."""
    return tuple(sorted({round(b, 6) for b in (0.4 * budget, budget, min(1.0, 2.5 * budget))
                         if b < 1.0}))


def _model_sweep(converted: nn.Module, state: _NaniteState, batch: torch.Tensor,
                 sites: list[str], ladder) -> Any:
    """`sensitivity.sweep` on the first row of the first calibration batch (cut to
    ``NaniteConfig.plan_tokens`` by `_cut`)."""
    from . import planner, sensitivity
    from .evaluate import _forward_kwargs, forward_takes
    from .passes.rewrite import site_params

    index = _site_index(state)
    if batch.dim() == 2 and not batch.is_floating_point():
        batch = batch[:1]
    name = getattr(converted, "main_input_name", None)
    extra = _forward_kwargs(converted)
    positions_from, positions_step = sensitivity.DISTANCE_FROM, sensitivity.DISTANCE_STEP
    if forward_takes(converted, "logits_to_keep") and batch.dim() == 2 and not batch.is_floating_point():
        # a Hugging Face LM computes the logits of the compared positions only (the output
        # layer over 49152 tokens is a tenth of SmolLM2's forward)
        n = int(batch.shape[-1])
        start = min(int(n * positions_from), n - 1)
        positions_from = 0.0
        if positions_step > 1 and forward_takes(converted, "logits_to_keep", "Tensor"):
            # the compared positions only (transformers takes their indices)
            extra["logits_to_keep"] = torch.arange(start, n, positions_step)
            positions_step = 1
        else:
            extra["logits_to_keep"] = n - start

    def run():
        if name:
            return converted(**_token_inputs(converted, name, batch), **extra)
        return converted(batch, **extra)

    params = {s: (s + state.tag, site_params(index[s][0].context(), s)) for s in sites}
    swept = [b for b in planner.candidate_budgets(ladder) if b < 1.0]
    # reference, uniform, the replay check, and each site at each candidate but the uniform one
    bar = _progress(None, "nanite: end-to-end sweep", total=3 + (len(swept) - 1) * len(sites))
    was_training = converted.training
    converted.eval()  # the model as it will run: dropout would make every distance noise
    try:
        sw = sensitivity.sweep(converted, run, params, {s: swept for s in sites},
                               progress=(lambda: bar.update(1)) if bar is not None else None,
                               positions_from=positions_from, positions_step=positions_step)
    finally:
        converted.train(was_training)
        if bar is not None:
            bar.close()
    sw.tokens = int(batch.shape[-1]) if batch.dim() >= 1 else 0
    return sw


def _calibration_nll(model: nn.Module, ids: torch.Tensor) -> float | None:
    """Mean next-token loss of ``model`` on ``ids``, or None when it is not a causal LM
    (an encoder, a module of another kind): the plan is then kept unchecked."""
    from .evaluate import logits_of, token_nll

    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return None  # not a causal LM: no next-token loss to compare
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 2:
        return None
    try:
        with torch.no_grad():
            return float(token_nll(logits_of(model, ids), ids).mean())
    except (TypeError, ValueError):
        return None


def _undo_plans(state: _NaniteState, before: dict[str, dict]) -> None:
    """Put the named sites back on the uniform plan (their report entries as they were)."""
    from .passes.rewrite import site_params

    index = _site_index(state)
    for site, rep_plan in before.items():
        backend, rep = index[site]
        backend.plans.pop(site, None)
        _ops.set_site_plans({site + state.tag: site_params(backend.context(), site)})
        rep.plan = rep_plan


def _covered(samples: list[tuple]) -> bool:
    """Whether ``samples`` hold ``_PLAN_QUERIES`` query positions, or as many calls as
    the collection keeps."""
    return (len(samples) >= _CALIBRATION_SAMPLES
            or sum(int(smp[0].shape[2]) for smp in samples) >= _PLAN_QUERIES)


def _enough(samples: list[tuple]) -> list[tuple]:
    """The first samples that cover ``_PLAN_QUERIES`` query positions (at least one)."""
    out, n = [], 0
    for smp in samples:
        if out and n >= _PLAN_QUERIES:
            break
        out.append(smp)
        n += int(smp[0].shape[2])
    return out


def _progress(items, desc: str, total: int | None = None):
    """A tqdm progress bar on a terminal (items wrapped, or a bar to update); plain otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    if items is None:
        return tqdm(total=total, desc=desc, disable=None, leave=False)
    return tqdm(items, desc=desc, disable=None, leave=False)


def convert(
    model: nn.Module,
    *,
    budget: float = _UNSET,
    calibration: Any = None,
    config: NaniteConfig | dict | None = None,
) -> nn.Module:
    """Convert every attention of ``model`` into tiled attention under a budget.

    Args:
        model: any ``torch.nn.Module`` (Hugging Face models keep ``generate``).
            It is not modified.
        budget: share of the original attention's key reads to keep, in
            ``(0, 1]`` (default 0.25; 1.0 keeps attention exact). Overrides
            ``config.budget``.
        calibration: token ids ``[B, N]``, a tokenizer's output (``input_ids``,
            each row without its padding), or an iterable of them. They are
            run through the model with every site exact while each site's
            inputs are kept, and the cost model (``nanite_compile.planner``)
            spends the budget across sites where it helps most: by default
            where it keeps the model's output closest to the original's
            (``config.objective``; ``nanite_compile.sensitivity`` measures each
            site's effect on the first calibration sequence), and
            ``config.max_error`` keeps hopeless sites exact. Without it
            every site gets the same budget: a Hugging Face model is probed
            with synthetic tokens, any other module is captured on its first
            forward.
        config: a `NaniteConfig` or a dict of its options.

    Returns:
        A model of the same class sharing ``model``'s parameters, whose
        attention runs as ``torch.ops.nanite.tiled_attention``. See
        `report` for what was done.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an option has the wrong type.
        ValueError: ``budget`` is outside ``(0, 1]`` or NaN.
    """
    return _convert(model, budget=budget, calibration=calibration, config=config)


def _convert(model: nn.Module, *, budget: Any = _UNSET, calibration: Any = None,
             config: Any = None, plans: dict | None = None) -> nn.Module:
    """`convert`; with ``plans`` (site -> plan dict, as saved) those plans are applied
    instead of running the cost model."""
    _check_model(model)
    cfg = _resolve_config(budget, config)
    given = _calibration_batches(calibration)
    # the sweep, the read measurement, the loss check and the probe see one length, and
    # no calibration forward runs past the model's position table (a long text given as
    # one sequence would otherwise fail inside the model's embedding)
    length = cfg.plan_tokens if cfg.objective == "model" else None
    limit = _context_limit(model)
    if limit is not None and (length is None or length > limit):
        length = limit
    batches = _cut(given, length) if given else given
    converted = _share_copy(model)
    state = _NaniteState(config=cfg, tag=f"@c{next(_CONVERSIONS)}")
    converted.__dict__["_nanite_state"] = state
    probe = _probe_inputs(converted, batches)
    if probe is None:
        state.pending = True
        state.notes.append("no probe input: attention sites are found at the first forward")
        _capture_on_first_call(converted, state, plans)
        return converted
    was_training = converted.training
    # captured, calibrated and measured as it will serve: in training mode an attention
    # with a non-zero dropout is left exact
    converted.eval()
    if was_training:
        state.notes.append(
            "the model was in training mode: it was captured in eval mode (called in training "
            "mode, an attention with a non-zero dropout runs exact)")
    try:
        _capture(converted, state, *_shortened(probe))
    except Exception as e:
        converted.train(was_training)
        if state.installed:  # failed after attention was captured: not the probe's doing
            raise
        if given is not None:  # the user's calibration, not a made-up probe: say so
            raise _refused(model, "the first calibration tensor", batches[0], e) from e
        # the model refused the made-up probe (an input it needs that the probe lacks):
        # find the attention at the first real forward instead, as without a probe
        state.pending = True
        state.notes.append(f"the probe forward failed ({type(e).__name__}: {str(e)[:120]}); "
                           "attention sites are found at the first forward")
        _capture_on_first_call(converted, state, plans)
        return converted
    if plans:
        _apply_plans(state, plans)
    elif batches is not None and cfg.budget_reads is not None:
        state.notes.append("cost model not run: budget_reads fixes every site's reads per query")
    elif batches is not None and cfg.budget < 1.0:
        _calibrate(converted, state, batches, given)
    _measure(converted, state, *probe)
    converted.train(was_training)
    return converted


def report(model: nn.Module) -> RewriteReport:
    """The rewrite report of a converted (or ``torch.compile(backend="nanite")``) model.

    Raises:
        ValueError: the model was neither converted nor compiled with the nanite backend.
    """
    _check_model(model)
    state = model.__dict__.get("_nanite_state")
    if state is not None:
        sites = [s for be in state.backends.values() for s in be.sites]
        return RewriteReport(model=type(model).__name__, config=state.config.to_dict(),
                             sites=sites, notes=list(state.notes))
    inner = getattr(model, "_orig_mod", model)
    name = type(inner).__name__
    if inner is not model and "_nanite_state" in inner.__dict__:
        return report(inner)  # torch.compile of a converted model: convert's record
    if inner is not model and compiled_with_nanite(model) is False:
        raise ValueError(f"{name} was compiled with another torch.compile backend: compile it "
                         "with backend='nanite' (or convert it) for a nanite report")
    # compiled (a wrapper, or in place by nn.Module.compile): Dynamo may run a graph it
    # compiled for another instance of the class, found by parameter shapes
    compiled = inner is not model or getattr(inner, "_compiled_call_impl", None) is not None
    sites = sites_for(inner, by_shape=compiled)
    if sites is None:
        if compiled:
            raise ValueError(f"{name} was compiled but has not run: the nanite backend rewrites "
                             "each graph at its first call; run the model once, then ask")
        raise ValueError(
            f"{name} was not converted: call nanite_compile.convert(model) or "
            "torch.compile(model, backend='nanite') and run it once"
        )
    return RewriteReport(model=name, config={}, sites=sites)
