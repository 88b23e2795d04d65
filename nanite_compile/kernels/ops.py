"""The registered operator ``torch.ops.nanite.tiled_attention``.

This module holds the schema, the fake (meta) implementation and the autograd
formula; it imports Triton (``triton_attn``) only when the op first runs on
CUDA tensors. The graph rewrite emits calls to this op, so a
converted model still works with torch.compile, torch.export and autograd.

Run-time recording: inside ``recording(...)`` every call reports, per site,
which path ran (tiled or exact, and why), the key reads per query against the
original's, and, when asked, the relative error against exact attention on
the same inputs or the level table of the first batch element (``[Hkv, mq,
mk]`` int8, on the CPU, for pictures of the plan). ``convert`` uses it on its
probe run to fill the report.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from ..config import IMPLS
from . import cpu as _cpu
from . import decode as _decode
from .levels import DEFAULT_SHARPNESS, TileParams
from .reference import exact_attention
from .reference import tiled_attention as _tiled_reference

_RECORDER: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "nanite_recorder", default=None
)
_MEASURE_ERROR: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nanite_measure_error", default=False
)
_RECORD_LEVELS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nanite_record_levels", default=False
)


@contextlib.contextmanager
def recording(measure_error: bool = False, levels: bool = False) -> Iterator[dict]:
    """Collect per-site run-time records of every op call in the block.

    Args:
        measure_error: add ``rel_error`` against exact attention (an exact pass more).
        levels: add ``levels``, the level table of the first batch element,
            ``[Hkv, mq, mk]`` int8 on the CPU, when the tiled path ran.

    Yields:
        A dict ``site -> list of records`` filled as the op runs.
    """
    store: dict = {}
    t1 = _RECORDER.set(store)
    t2 = _MEASURE_ERROR.set(measure_error)
    t3 = _RECORD_LEVELS.set(levels)
    try:
        yield store
    finally:
        _RECORDER.reset(t1)
        _MEASURE_ERROR.reset(t2)
        _RECORD_LEVELS.reset(t3)


# site key (the op's ``site`` argument) -> TileParams chosen by the cost model after
# capture; a site with an entry runs that plan instead of the one in its graph
_SITE_PLANS: dict[str, TileParams] = {}
# when set, calls record their inputs (site -> list) and return exact attention
_COLLECT: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "nanite_collect", default=None
)


def set_site_plans(plans: dict[str, TileParams]) -> None:
    """Give sites (by op site key) the plans a cost model chose; they win over the graph's."""
    _SITE_PLANS.update(plans)


def site_plan(key: str) -> TileParams | None:
    """The plan a site (by op site key) was given with `set_site_plans`, if any."""
    return _SITE_PLANS.get(key)


def drop_site_plans(keys) -> None:
    for key in keys:
        _SITE_PLANS.pop(key, None)


def site_name(site: str) -> str:
    """The report name of an op site key (``path@conversion`` -> ``path``)."""
    return site.partition("@")[0]


@contextlib.contextmanager
def collecting(max_calls: int = 8) -> Iterator[dict]:
    """Record each op call's inputs per site while running exact attention.

    The calibration run of the cost model: the model computes what the
    original computes (every site exact), and each site's ``(q, k, v,
    attn_mask, scale, is_causal)`` of its first ``max_calls`` calls is kept
    (detached).

    Yields:
        A dict ``site name -> list of input tuples``.
    """
    store: dict = {"__max__": max_calls}
    token = _COLLECT.set(store)
    try:
        yield store
    finally:
        _COLLECT.reset(token)
        store.pop("__max__", None)


def _params(tile, window, anchors, horizon, budget, budget_reads, state_features,
            sharpness: float = DEFAULT_SHARPNESS, max_level: int = -1,
            select: str = "row", row_tiles: int = 1) -> TileParams:
    return TileParams(
        tile=tile,
        window=window,
        anchors=anchors,
        horizon=None if horizon < 0 else horizon,
        budget=budget,
        budget_reads=None if budget_reads <= 0 else budget_reads,
        state_features=state_features,
        sharpness=sharpness,
        max_level=None if max_level < 0 else max_level,
        select=select,
        row_tiles=row_tiles,
    )


def _resolve(site: str, *plan) -> TileParams:
    over = _SITE_PLANS.get(site)
    return over if over is not None else _params(*plan)


_TRITON: list = []  # the Triton module, or None when Triton is missing, once looked up


def _triton_module():
    if not _TRITON:
        from . import triton_attn

        _TRITON.append(triton_attn if triton_attn.available() else None)
    return _TRITON[0]


def _fast_path(q: torch.Tensor, impl: str = "auto"):
    """The fast implementation ``impl`` asks for on q's device.

    ``"auto"``: Triton on CUDA when installed, else ``cpu.py`` (which applies on
    the CPU only; elsewhere the reference arithmetic runs). ``"torch"``: never
    Triton. ``"triton"``: the Triton kernel, or an error saying what is missing.
    Which implementation ran is recorded as ``impl`` (``cpu``, ``triton_attn``
    or ``reference``).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return _cpu
    if impl == "triton":
        mod = _triton_module()
        if mod is None:
            raise RuntimeError("impl='triton' but Triton is not installed: pip install triton, "
                               "or convert with impl='auto' or 'torch'")
        if q.device.type != "cuda" and not mod._interpreting():
            raise RuntimeError(f"impl='triton' runs on CUDA tensors (got {q.device.type}; on the "
                               "CPU only under TRITON_INTERPRET=1): move the model to a GPU or "
                               "convert with impl='auto' or 'torch'")
        return mod
    if q.device.type == "cuda" and _triton_module() is not None:
        return _triton_module()
    return _cpu


@torch.library.custom_op("nanite::tiled_attention", mutates_args=(), device_types=None)
def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    tile: int,
    window: int,
    anchors: int,
    horizon: int,
    budget: float,
    budget_reads: int,
    state_features: int,
    seed: int,
    site: str,
    sharpness: float = DEFAULT_SHARPNESS,
    impl: str = "auto",
    max_level: int = -1,
    select: str = "row",
    row_tiles: int = 1,
) -> torch.Tensor:
    """Tiled attention, DESIGN.md section 1.

    Args:
        q: ``[B, H, Nq, D]``.
        k: ``[B, Hkv, Nk, D]`` (``H`` a multiple of ``Hkv``: GQA by index).
        v: ``[B, Hkv, Nk, Dv]``.
        attn_mask: None, or a bool/additive mask broadcastable to ``[B, H, Nq, Nk]``.
        scale: softmax scale.
        is_causal: SDPA's causal flag.
        tile, window, anchors, horizon, budget, budget_reads, state_features:
            the site's plan (``horizon < 0`` and ``budget_reads <= 0`` mean unset).
        seed: seed of the random features.
        site: the site's key: its name for run-time records (the part before
            ``@``), and the key of a plan set by `set_site_plans`, which then
            replaces the plan arguments.
        sharpness: how sharply key reads follow the query-aware mass
            estimate (0: density over distance).
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (`NaniteConfig.impl`): an
            explicit ``"triton"`` raises where the kernel cannot run the tiled
            path instead of falling back to PyTorch.
        max_level: the coarsest pooled level a kept tile is read at (``-1``:
            every level, the op's behaviour before the argument existed).
        select: ``"row"`` (one level table row per query tile) or ``"query"``
            (each query reads its own exact tiles, `levels.build_query_selection`).
        row_tiles: query tiles per level table row under causality (1, or 2: a
            pair of tiles shares one choice of what lies before it).

    Returns:
        ``[B, H, Nq, Dv]`` in q's dtype.
    """
    collect = _COLLECT.get()
    if collect is not None:
        calls = collect.setdefault(site_name(site), [])
        if len(calls) < collect["__max__"]:
            calls.append(tuple(t.detach() if isinstance(t, torch.Tensor) else t
                               for t in (q, k, v, attn_mask, scale, is_causal)))
        return exact_attention(q, k, v, attn_mask, scale, is_causal).contiguous()
    params = _resolve(site, tile, window, anchors, horizon, budget, budget_reads,
                      state_features, sharpness, max_level, select, row_tiles)
    site = site_name(site)
    store = _RECORDER.get()
    stats: dict | None = {} if store is not None else None
    # one query whose k/v a bounded generation cache handed over (kernels/decode.py):
    # its counts and state come from the cache, the mask from the cache's own validity
    compressed = _decode.lookup(q, k, v) if q.shape[2] == 1 else None
    if compressed is not None:
        out = _decode.decode_attention(q, compressed, scale).contiguous()
        if stats is not None:
            stats.update(path="decode", reason="bounded generation cache",
                         reads_per_query=float(k.shape[2]) + (
                             compressed.state_z.shape[-1] if compressed.state_z is not None else 0))
    else:
        out = _tiled_reference(
            q, k, v, attn_mask, scale=scale, is_causal=is_causal, params=params, seed=seed,
            stats=stats, fast=_fast_path(q, impl), require_fast=impl == "triton",
        ).contiguous()
    if store is not None:
        rec = {
            "path": stats.get("path"),
            "reason": stats.get("reason", ""),
            "impl": stats.get("impl", ""),
            "mask": stats.get("mask", ""),
            "reads_per_query": stats.get("reads_per_query"),
            "exact_reads_per_query": stats.get("exact_reads_per_query"),
            "computed_per_query": stats.get("computed_per_query", stats.get("reads_per_query")),
            "q_shape": list(q.shape),
            "k_shape": list(k.shape),
        }
        if _MEASURE_ERROR.get():
            ref = exact_attention(q, k, v, attn_mask, scale, is_causal).float()
            err = (out.float() - ref).norm() / ref.norm().clamp_min(1e-30)
            rec["rel_error"] = float(err)
        if _RECORD_LEVELS.get() and stats.get("levels") is not None:
            rec["levels"] = stats["levels"][0].detach().to("cpu", copy=True)
        store.setdefault(site, []).append(rec)
    return out


@tiled_attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, tile, window, anchors, horizon, budget,
      budget_reads, state_features, seed, site, sharpness=DEFAULT_SHARPNESS, impl="auto",
      max_level=-1, select="row", row_tiles=1):
    torch._check(q.dim() == 4, lambda: "q must be [B, H, N, D]")
    torch._check(k.dim() == 4 and v.dim() == 4, lambda: "k and v must be [B, Hkv, N, D]")
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


@torch.library.custom_op("nanite::tiled_attention_backward", mutates_args=(), device_types=None)
def tiled_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    tile: int,
    window: int,
    anchors: int,
    horizon: int,
    budget: float,
    budget_reads: int,
    state_features: int,
    seed: int,
    sharpness: float = DEFAULT_SHARPNESS,
    max_level: int = -1,
    select: str = "row",
    row_tiles: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``tiled_attention`` w.r.t. q, k, v (recomputed in PyTorch).

    The level table depends on the keys only through a discrete choice, so it
    is held fixed: the gradient is that of the chosen tiled attention. Its own
    op, so that tracing (AOT autograd, export) sees one opaque call.
    """
    params = _params(tile, window, anchors, horizon, budget, budget_reads, state_features,
                     sharpness, max_level, select, row_tiles)
    # the op body runs below the autograd key; torch.func builds its own graph
    def f(q_, k_, v_):
        return _tiled_reference(q_, k_, v_, attn_mask, scale=scale, is_causal=is_causal,
                                params=params, seed=seed)

    _, vjp = torch.func.vjp(f, q, k, v)
    gq, gk, gv = vjp(grad)
    return gq.contiguous(), gk.contiguous(), gv.contiguous()


@tiled_attention_backward.register_fake
def _(grad, q, k, v, attn_mask, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask = inputs[:4]
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(q, k, v, attn_mask if attn_mask is not None else q.new_empty(0))
    ctx.has_mask = attn_mask is not None
    scale, is_causal = inputs[4:6]
    site = inputs[14]
    sharpness = inputs[15] if len(inputs) > 15 else DEFAULT_SHARPNESS
    max_level = inputs[17] if len(inputs) > 17 else -1
    select = inputs[18] if len(inputs) > 18 else "row"
    row_tiles = inputs[19] if len(inputs) > 19 else 1
    p = _resolve(site, *inputs[6:13], sharpness, max_level, select, row_tiles)  # as the forward ran
    ctx.rest = (scale, is_causal, p.tile, p.window, p.anchors,
                -1 if p.horizon is None else p.horizon, p.budget,
                0 if p.budget_reads is None else p.budget_reads, p.state_features,
                inputs[13], p.sharpness, -1 if p.max_level is None else p.max_level, p.select,
                p.row_tiles)


def _backward(ctx, grad):
    q, k, v, mask = ctx.saved_tensors
    mask = mask if ctx.has_mask else None
    gq, gk, gv = tiled_attention_backward(grad.contiguous(), q, k, v, mask, *ctx.rest)
    return (gq, gk, gv) + (None,) * (ctx.n_inputs - 3)


tiled_attention.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "nanite.tiled_attention has a first derivative only (a double backward, e.g. "
        "autograd.grad(..., create_graph=True) then another grad, is not supported): take "
        "higher derivatives through the original model")


tiled_attention_backward.register_autograd(_no_double_backward,
                                           setup_context=lambda ctx, inputs, output: None)
