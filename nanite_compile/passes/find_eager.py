"""Find attention written out by hand: ``softmax(q·kᵀ·s + mask)·v`` and its spellings.

Each ``softmax`` over the last dimension is a candidate. From it the finder
walks *back* to the score product ``q·kᵀ`` (``matmul``/``@``, ``bmm``,
``baddbmm``, ``einsum``), collecting on the way the scale (``mul``/``div`` by
a constant or a scalar node, before the product on ``q``/``k`` or after it on
the scores), the masks (``+ mask``, ``masked_fill(cond, -inf)``,
``where(cond, scores, -inf)``) and casts; and *forward* to the product with
``v`` (through casts and inactive dropout). A softmax that does not sit
between two such products (a classifier head, a router) is not attention and
is left alone. One that does, but through a step neither walk reads (XGLM's
``torch.max`` clamp of the scores, Bloom's and XGLM's view of the weights as
``[B, H, N, N]`` and back, GPT-OSS's sink logits joined by ``torch.cat``), is
attention the rewrite cannot prove equal to the op's: it is reported as a
skipped site naming those steps, and runs exact.

Patterns (``AttentionMatch.pattern``):

- ``eager``: ``matmul`` chains, 4-D ``[B, H, N, D]`` (3-D with ``view_4d``);
- ``einsum``: ``einsum("bhqd,bhkd->bhqk")`` … ``einsum("bhqk,bhkd->bhqd")``,
  any letters and layouts (operands are permuted to ``[B, H, N, D]``);
- ``bmm``: 3-D ``bmm``/``baddbmm`` chains ``[B*H, N, D]`` (``view_4d``), as in
  ``F.multi_head_attention_forward``'s slow path;
- ``mha``: ``F.multi_head_attention_forward``, which Dynamo keeps as one call
  (``nn.MultiheadAttention``), and ``torch._transformer_encoder_layer_fwd``
  (``nn.TransformerEncoderLayer``'s fast path in eval under ``no_grad``): each
  is split into plain functions around one SDPA node (in-projection, attention,
  the rest of the layer) so the attention alone is rewritten.

GQA ``repeat_kv`` (``k[:, :, None].expand(...).reshape(...)``,
``repeat_interleave(n, dim=1)``, a head-broadcasting ``expand``) is matched
through: the op gets the un-repeated ``k``/``v``.

Masks: a ``tril`` buffer slice (nanoGPT's ``bias[:, :, :T, :T] == 0``) is
proven causal from the buffer's value and becomes ``is_causal=True``. Other
masks go to the op dense (it reads causal/padding/window structure at run
time): a boolean ``masked_fill``/``where`` condition as the *allowed* mask, an
additive term when the graph shows it is a mask (a graph input, or built by
comparisons, ``where``/``masked_fill`` with ``0``/``-inf``/``finfo.min``,
``(1 - m) * finfo.min``, a buffer holding only such values). Anything else added to the scores
(ALiBi slopes, relative position embeddings), a ``tanh`` soft-cap, a scale
that is a tensor, dropout in training mode, or attention weights used outside
the chain leave the site exact, with the reason in the match.

Works on Dynamo graphs (``torch`` functions, methods, ``operator``) and on
ATen graphs (``torch.export``'s ``aten.*`` ops).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import (
    AttentionMatch,
    PassContext,
    guarded_zero,
    module_path,
    node_shape,
    node_value,
)
from .find_sdpa import mask_kind_of

aten = torch.ops.aten

# An additive constant at or below this blocks a key (same threshold as the op's mask reader,
# which also checks at run time that the logits cannot outweigh it).
_BLOCKED_BELOW = -1.0e4
# A constant *written over* the scores (masked_fill, where) leaves no run-time trace of the
# scores it replaced: it is a block only if no allowed logit can sink below it, i.e. it is
# -inf or far beyond any logit a model produces. masked_fill(m, -1e4) with logits of order
# 1e4 lets the "blocked" keys through in the original; such a site stays exact.
_REPLACED_BLOCKS_BELOW = -1.0e9

# ---------------------------------------------------------------------------
# What a node computes: a small vocabulary of kinds, arguments bound by name.
# ---------------------------------------------------------------------------

# kind, positional parameter names (first is the tensor the op works on)
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    operator.matmul: ("matmul", ("input", "other")),
    torch.matmul: ("matmul", ("input", "other")),
    torch.bmm: ("bmm", ("input", "other")),
    torch.baddbmm: ("baddbmm", ("bias", "input", "other")),
    torch.einsum: ("einsum", ("equation",)),
    F.softmax: ("softmax", ("input", "dim", "_stacklevel", "dtype")),
    torch.softmax: ("softmax", ("input", "dim", "dtype")),
    F.dropout: ("dropout", ("input", "p", "training", "inplace")),
    torch.dropout: ("dropout", ("input", "p", "training")),
    operator.mul: ("mul", ("input", "other")),
    torch.mul: ("mul", ("input", "other")),
    operator.truediv: ("div", ("input", "other")),
    torch.div: ("div", ("input", "other")),
    torch.true_divide: ("div", ("input", "other")),
    operator.add: ("add", ("input", "other")),
    torch.add: ("add", ("input", "other")),
    operator.sub: ("sub", ("input", "other")),
    torch.sub: ("sub", ("input", "other")),
    torch.rsub: ("rsub", ("input", "other")),
    torch.masked_fill: ("masked_fill", ("input", "mask", "value")),
    torch.where: ("where", ("condition", "input", "other")),
    torch.transpose: ("transpose", ("input", "dim0", "dim1")),
    torch.permute: ("permute", ("input", "dims")),
    torch.tanh: ("tanh", ("input",)),
    torch.repeat_interleave: ("repeat_interleave", ("input", "repeats", "dim")),
    torch.reshape: ("view", ("input", "shape")),
    torch.unsqueeze: ("unsqueeze", ("input", "dim")),
    torch.squeeze: ("view", ("input",)),
    torch.flatten: ("view", ("input",)),
    torch.clone: ("identity", ("input",)),
    operator.invert: ("not", ("input",)),
    torch.logical_not: ("not", ("input",)),
    torch.bitwise_not: ("not", ("input",)),
    operator.getitem: ("getitem", ("input", "index")),
    builtins.getattr: ("getattr", ("input", "name")),
    torch.tril: ("tri", ("input", "diagonal")),
    torch.triu: ("tri", ("input", "diagonal")),
    torch.cat: ("cat", ("tensors", "dim")),
    torch.full: ("full", ("size", "fill_value")),
    torch.full_like: ("full", ("input", "fill_value")),
    torch.zeros: ("zeros", ()),
    torch.zeros_like: ("zeros", ("input",)),
    torch.ones: ("ones", ()),
    torch.ones_like: ("ones", ("input",)),
    torch.tensor: ("tensor", ("data",)),
    torch.scalar_tensor: ("tensor", ("data",)),
    operator.eq: ("compare", ("input", "other")),
    operator.ne: ("compare", ("input", "other")),
    operator.lt: ("compare", ("input", "other")),
    operator.le: ("compare", ("input", "other")),
    operator.gt: ("compare", ("input", "other")),
    operator.ge: ("compare", ("input", "other")),
    operator.and_: ("logic", ("input", "other")),
    operator.or_: ("logic", ("input", "other")),
    torch.logical_and: ("logic", ("input", "other")),
    torch.logical_or: ("logic", ("input", "other")),
}
for _f in (torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge):
    _FUNCTIONS[_f] = ("compare", ("input", "other"))

# ``scores /= s``, ``scores += mask`` (Falcon, ...): Dynamo records the augmented
# assignment as the in-place operator, whose result later code reads. Inside a
# rewritten chain the mutated tensor is private to the chain (every use of an
# interior node is checked to be interior), so the operator becomes its pure form.
_INPLACE_TO_PURE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
for _f, _pure in _INPLACE_TO_PURE.items():
    _FUNCTIONS[_f] = _FUNCTIONS[_pure]

_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "matmul": ("matmul", ("input", "other")),
    "__matmul__": ("matmul", ("input", "other")),
    "bmm": ("bmm", ("input", "other")),
    "baddbmm": ("baddbmm", ("bias", "input", "other")),
    "softmax": ("softmax", ("input", "dim", "dtype")),
    "mul": ("mul", ("input", "other")),
    "div": ("div", ("input", "other")),
    "true_divide": ("div", ("input", "other")),
    "add": ("add", ("input", "other")),
    "sub": ("sub", ("input", "other")),
    "masked_fill": ("masked_fill", ("input", "mask", "value")),
    "masked_fill_": ("masked_fill", ("input", "mask", "value")),
    "where": ("where_method", ("input", "condition", "other")),
    "transpose": ("transpose", ("input", "dim0", "dim1")),
    "permute": ("permute", ("input",)),  # varargs
    "tanh": ("tanh", ("input",)),
    "to": ("cast", ("input",)),
    "type": ("cast", ("input",)),
    "type_as": ("cast", ("input", "other")),
    "float": ("cast", ("input",)),
    "double": ("cast", ("input",)),
    "half": ("cast", ("input",)),
    "bfloat16": ("cast", ("input",)),
    "expand": ("expand", ("input",)),  # varargs
    "expand_as": ("expand", ("input",)),
    "reshape": ("view", ("input",)),  # varargs
    "view": ("view", ("input",)),  # varargs
    "flatten": ("view", ("input",)),
    "squeeze": ("view", ("input",)),
    "unsqueeze": ("unsqueeze", ("input", "dim")),
    "repeat_interleave": ("repeat_interleave", ("input", "repeats", "dim")),
    "repeat": ("view", ("input",)),
    "contiguous": ("identity", ("input",)),
    "clone": ("identity", ("input",)),
    "logical_not": ("not", ("input",)),
    "bitwise_not": ("not", ("input",)),
    "__invert__": ("not", ("input",)),
    "tril": ("tri", ("input", "diagonal")),
    "triu": ("tri", ("input", "diagonal")),
    "new_full": ("full", ("input", "size", "fill_value")),
    "new_zeros": ("zeros", ("input",)),
    "new_ones": ("ones", ("input",)),
    "eq": ("compare", ("input", "other")),
    "ne": ("compare", ("input", "other")),
    "lt": ("compare", ("input", "other")),
    "le": ("compare", ("input", "other")),
    "gt": ("compare", ("input", "other")),
    "ge": ("compare", ("input", "other")),
    "logical_and": ("logic", ("input", "other")),
    "logical_or": ("logic", ("input", "other")),
    "bool": ("cast", ("input",)),
    "long": ("cast", ("input",)),
    "int": ("cast", ("input",)),
}

# ATen overload packets -> kind; arguments are bound through the op's schema.
_ATEN: dict[Any, str] = {
    aten.matmul: "matmul",
    aten.bmm: "bmm",
    aten.baddbmm: "baddbmm",
    aten.einsum: "einsum",
    aten.softmax: "softmax",
    aten._softmax: "softmax",
    aten.dropout: "dropout",
    aten.mul: "mul",
    aten.div: "div",
    aten.add: "add",
    aten.sub: "sub",
    aten.rsub: "rsub",
    aten.masked_fill: "masked_fill",
    aten.masked_fill_: "masked_fill",  # torch.export keeps _canonical_mask's in-place fill
    aten.where: "where",
    aten.transpose: "transpose",
    aten.permute: "permute",
    aten.tanh: "tanh",
    aten.to: "cast",
    aten._to_copy: "cast",
    aten.type_as: "cast",
    aten.expand: "expand",
    aten.reshape: "view",
    aten.view: "view",
    aten._unsafe_view: "view",
    aten.squeeze: "view",
    aten.flatten: "view",
    aten.unsqueeze: "unsqueeze",
    aten.repeat_interleave: "repeat_interleave",
    aten.clone: "identity",
    aten.contiguous: "identity",
    aten.alias: "identity",
    aten.lift_fresh_copy: "identity",
    aten.logical_not: "not",
    aten.bitwise_not: "not",
    aten.slice: "slice",
    aten.tril: "tri",
    aten.triu: "tri",
    aten.cat: "cat",
    aten.full: "full",
    aten.full_like: "full",
    aten.zeros: "zeros",
    aten.zeros_like: "zeros",
    aten.ones: "ones",
    aten.ones_like: "ones",
    aten.scalar_tensor: "tensor",
    aten.eq: "compare",
    aten.ne: "compare",
    aten.lt: "compare",
    aten.le: "compare",
    aten.gt: "compare",
    aten.ge: "compare",
    aten.logical_and: "logic",
    aten.logical_or: "logic",
    aten.bitwise_and: "logic",
    aten.bitwise_or: "logic",
}
_ATEN_RENAME = {"self": "input", "mat2": "other", "train": "training"}
_ATEN_BADDBMM = {"self": "bias", "batch1": "input", "batch2": "other"}


@dataclass
class _Op:
    kind: str
    args: dict
    varargs: tuple = ()


def _op(node: Any) -> _Op | None:
    """What ``node`` computes, in this module's vocabulary, or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        spec = _METHODS.get(node.target)
        if spec is None:
            return None
        kind, names = spec
        bound = dict(zip(names, node.args, strict=False))
        rest = tuple(node.args[len(names) :])
        bound.update(node.kwargs)
        if kind == "where_method":  # x.where(cond, y) == where(cond, x, y)
            kind = "where"
        return _Op(kind, _baddbmm_names(kind, bound), rest)
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        kind = _ATEN.get(target.overloadpacket)
        if kind is None:
            return None
        if kind == "einsum":
            return _Op(kind, {"equation": node.args[0], "operands": tuple(node.args[1])})
        raw = {a.name: v for a, v in zip(target._schema.arguments, node.args, strict=False)}
        raw.update(node.kwargs)
        if raw.get("rounding_mode") is not None:
            return None
        rename = _ATEN_BADDBMM if kind == "baddbmm" else _ATEN_RENAME
        return _Op(kind, {rename.get(k, k): v for k, v in raw.items()})
    spec = _FUNCTIONS.get(target)
    if spec is None:
        return None
    kind, names = spec
    bound = dict(zip(names, node.args, strict=False))
    rest = tuple(node.args[len(names) :])
    bound.update(node.kwargs)
    if kind == "einsum":
        ops = rest
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        bound["operands"] = ops
    if kind == "div" and bound.get("rounding_mode") is not None:
        return None
    return _Op(kind, _baddbmm_names(kind, bound), rest)


def _baddbmm_names(kind: str, bound: dict) -> dict:
    """``baddbmm``'s keyword spelling (``bias.baddbmm(batch1=q, batch2=kT)``, Bloom) bound
    to the positional names."""
    if kind == "baddbmm":
        for kw, name in (("batch1", "input"), ("batch2", "other")):
            if kw in bound:
                bound[name] = bound.pop(kw)
    return bound


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return t._schema.is_mutable
        return t in (
            operator.iadd,
            operator.isub,
            operator.imul,
            operator.itruediv,
            operator.setitem,
        )
    return False


_ASSERTS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten._assert_async.default,
    aten._assert_async.msg,
}


def _is_assert(node: fx.Node) -> bool:
    """Metadata checks torch.export adds after ``.to()`` calls: no value, not a real use."""
    return node.op == "call_function" and node.target in _ASSERTS


def _mutated(*nodes: Any) -> bool:
    """Whether any of ``nodes`` is modified in place somewhere in the graph."""
    return any(isinstance(n, fx.Node) and any(_is_inplace(u) for u in n.users) for n in nodes)


# ---------------------------------------------------------------------------
# Values: scalars, constants, shapes (symbolic sizes compared without guards).
# ---------------------------------------------------------------------------


def _is_scalar(x: Any) -> bool:
    """A Python number, a node holding one (``SymInt``/``SymFloat``, ``.item()``), or a
    one-element tensor filled with a constant (``torch.tensor(0.125)``)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float, torch.SymInt, torch.SymFloat)):
        return True
    if isinstance(x, fx.Node):
        v = node_value(x)
        if isinstance(v, torch.Tensor):
            return v.numel() == 1 and v.is_floating_point() and _const(x) is not None
        return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)
    return False


def _is_tensor(x: Any) -> bool:
    return isinstance(x, fx.Node) and isinstance(node_value(x), torch.Tensor) and not _is_scalar(x)


def _dtype(x: Any) -> torch.dtype | None:
    v = node_value(x)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _attr_tensor(node: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a ``get_attr`` node or a Dynamo placeholder, if reachable."""
    if node.op == "get_attr":
        obj = node.graph.owning_module
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj if isinstance(obj, torch.Tensor) else None
    if node.op == "placeholder":
        ga = node.meta.get("grapharg")
        ex = getattr(ga, "example", None) if ga is not None else None
        return ex if isinstance(ex, torch.Tensor) else None
    return None


def _const(x: Any, depth: int = 0) -> float | None:
    """The value of a constant scalar (a number, or a tensor filled with one number)."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node) or depth > 8:
        return None
    if x.op == "get_attr":
        t = _attr_tensor(x)
        if t is not None and t.numel() == 1 and not isinstance(t, torch.nn.Parameter):
            return float(t.reshape(()).item())
        return None
    o = _op(x)
    if o is None:
        return None
    if o.kind in ("cast", "identity", "expand", "view", "unsqueeze"):
        return _const(o.args.get("input"), depth + 1)
    if o.kind == "full":
        return _const(o.args.get("fill_value", o.varargs[0] if o.varargs else None), depth + 1)
    if o.kind == "zeros":
        return 0.0
    if o.kind == "ones":
        return 1.0
    if o.kind == "tensor":
        return _const(o.args.get("data"), depth + 1)
    return None


def _blocks(x: Any) -> bool:
    """A constant that blocks a key when added to the scores (checked again at run time)."""
    c = _const(x)
    return c is not None and c <= _BLOCKED_BELOW


def _blocks_by_replacing(x: Any) -> bool:
    """A constant that blocks a key when written over its score (masked_fill, where)."""
    c = _const(x)
    # fp16's finfo.min (-65504) is how half models mask: no fp16 logit lies below it
    return c is not None and (c <= _REPLACED_BLOCKS_BELOW or c == _FP16_MIN)


_FP16_MIN = float(torch.finfo(torch.float16).min)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - symbolic comparison unsupported: not provably equal
        return False


def _int(x: Any) -> int | None:
    """An int, or a SymInt that is a known constant; None otherwise (never specialises)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        return x.node.maybe_as_int()
    return None


def _norm_dim(d: Any, ndim: int) -> int | None:
    d = _int(d) if not isinstance(d, int) else d
    if d is None:
        return None
    return d + ndim if d < 0 else d


def _state_kind(node: fx.Node) -> str:
    """``parameter``, ``buffer`` (module state) or ``input`` for a leaf node."""
    if node.op == "get_attr":
        t = _attr_tensor(node)
        return "parameter" if isinstance(t, torch.nn.Parameter) else "buffer"
    ga = node.meta.get("grapharg")
    if ga is None or not isinstance(node_value(node), torch.Tensor):
        return "input"  # export: parameters and buffers are get_attr nodes; sizes are inputs
    ex = getattr(ga, "example", None)
    src = getattr(ga, "source", None)
    name = getattr(src, "name", "")
    name = name() if callable(name) else str(name)
    if isinstance(ex, torch.nn.Parameter) or "_parameters" in name:
        return "parameter"
    if "_buffers" in name or "." in name:
        return "buffer"
    return "input"


# ---------------------------------------------------------------------------
# Masks and biases added to the scores.
# ---------------------------------------------------------------------------


def _is_indicator(x: Any, depth: int = 0) -> bool:
    """A tensor whose entries are 0/1: booleans, an integer graph input, ``1 - m``."""
    if not isinstance(x, fx.Node) or depth > 24:
        return False
    if _dtype(x) == torch.bool:
        return True
    if x.op == "placeholder" and _state_kind(x) == "input":
        dt = _dtype(x)
        return dt is not None and not dt.is_floating_point
    o = _op(x)
    if o is None:
        return False
    if o.kind in ("cast", "identity", "expand", "view", "unsqueeze", "getitem", "slice", "not"):
        return _is_indicator(o.args.get("input"), depth + 1)
    if o.kind == "sub" and _const(o.args.get("input")) == 1.0:
        return _is_indicator(o.args.get("other"), depth + 1)
    if o.kind == "rsub" and _const(o.args.get("other")) == 1.0:
        return _is_indicator(o.args.get("input"), depth + 1)
    if o.kind == "mul":
        return _is_indicator(o.args.get("input"), depth + 1) and _is_indicator(
            o.args.get("other"), depth + 1
        )
    return False


def _mask_values_ok(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool or not t.is_floating_point():
        return False
    return bool(((t == 0) | (t <= _BLOCKED_BELOW)).all())


def _input_holds_bias(x: fx.Node) -> bool:
    """A floating graph input whose captured value holds entries other than 0 and blocking
    ones: a bias the caller computed (T5's relative position bias handed from layer to
    layer, ALiBi folded into the mask), not a mask. Masks stay inputs read at run time."""
    t = _attr_tensor(x)
    if t is None or not t.is_floating_point() or t.numel() == 0 or is_fake(t):
        return False
    with torch.no_grad():
        return not _mask_values_ok(t)


def _not_a_mask(x: Any, depth: int = 0) -> fx.Node | str | None:
    """None if ``x`` is provably an additive mask (entries 0 or blocking), else the culprit.

    Returns the node (or a description) at which the proof fails.
    """
    if not isinstance(x, fx.Node):
        c = _const(x)
        return None if c is not None and (c == 0 or c <= _BLOCKED_BELOW) else f"constant {x!r}"
    if depth > 40:
        return x
    if x.op in ("placeholder", "get_attr"):
        kind = _state_kind(x)
        if kind == "input":
            if _input_holds_bias(x):
                return x
            return None  # handed in by the caller: the op reads it at run time
        if kind == "buffer":
            t = _attr_tensor(x)
            if t is not None and _mask_values_ok(t):
                return None
        return x
    c = _const(x)
    if c is not None:
        return None if (c == 0 or c <= _BLOCKED_BELOW) else x
    o = _op(x)
    if o is None:
        return x
    a = o.args
    if o.kind in ("cast", "identity", "expand", "view", "unsqueeze", "getitem", "slice", "tri"):
        if _dtype(x) == torch.bool:
            return x
        return _not_a_mask(a.get("input"), depth + 1)
    if o.kind == "where":
        for side in (a.get("input"), a.get("other")):
            bad = _not_a_mask(side, depth + 1)
            if bad is not None:
                return bad
        return None
    if o.kind == "masked_fill":
        if not (_blocks(a.get("value")) or _const(a.get("value")) == 0):
            return x
        return _not_a_mask(a.get("input"), depth + 1)
    if o.kind == "add":
        if a.get("alpha", 1) != 1:
            return x
        return _not_a_mask(a.get("input"), depth + 1) or _not_a_mask(a.get("other"), depth + 1)
    if o.kind == "mul":  # (1 - m) * finfo.min
        lhs, rhs = a.get("input"), a.get("other")
        if _blocks(rhs) and _is_indicator(lhs, depth + 1):
            return None
        if _blocks(lhs) and _is_indicator(rhs, depth + 1):
            return None
        return x
    if o.kind == "cat":
        for t in a.get("tensors", ()):
            bad = _not_a_mask(t, depth + 1)
            if bad is not None:
                return bad
        return None
    return x


def _slices_from_origin(index: Any) -> bool:
    """``x[:, :, :a, :b]``: every entry a slice starting at 0 with step 1 (or ``...``/``None``)."""
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if it is Ellipsis or it is None:
            continue
        if not isinstance(it, slice) or it.start not in (None, 0) or it.step not in (None, 1):
            return False
    return True


def _causal_buffer(cond: Any, allowed_polarity: bool, scores: fx.Node) -> bool:
    """Whether a boolean mask condition is a top-left slice of a causal buffer.

    Recognises nanoGPT's ``self.bias[:, :, :T, :T] == 0`` (and ``!= 0``, ``> 0``,
    ``~``...) on a buffer whose value, read now, is lower-triangular: such a mask
    is exactly SDPA's ``is_causal`` (top-left aligned). ``allowed_polarity``: the
    condition marks allowed (True) or blocked (False) entries. Buffers are read at
    compile time: a model that rewrites its causal buffer later must be recompiled.
    """
    if not isinstance(cond, fx.Node):
        return False
    o = _op(cond)
    while o is not None and o.kind == "not":
        allowed_polarity = not allowed_polarity
        cond = o.args.get("input")
        o = _op(cond)
    if o is None or o.kind != "compare":
        return False
    tensors = [a for a in cond.args if isinstance(a, fx.Node)]
    if len(tensors) != 1 or cond.kwargs or cond.op not in ("call_function", "call_method"):
        return False
    (sliced,) = tensors
    ms, ss = node_shape(sliced), node_shape(scores)
    if ms is None or ss is None or len(ms) < 2:
        return False
    if not (_same(ms[-2], ss[-2]) and _same(ms[-1], ss[-1])):
        return False  # must not broadcast along the query or key axis
    x = sliced
    for _ in range(8):
        so = _op(x)
        if so is None:
            break
        if so.kind == "getitem" and _slices_from_origin(so.args.get("index")):
            x = so.args.get("input")
        elif (
            so.kind == "slice"
            and so.args.get("start") in (None, 0)
            and (so.args.get("step", 1) in (None, 1))
        ):
            x = so.args.get("input")
        else:
            return False
    if not isinstance(x, fx.Node) or x.op not in ("placeholder", "get_attr"):
        return False
    if _state_kind(x) != "buffer":
        return False
    full = _attr_tensor(x)
    if full is None or full.dim() < 2:
        return False
    fn = cond.target if cond.op == "call_function" else getattr(torch.Tensor, cond.target)
    with torch.no_grad():
        m = fn(*[full if a is sliced else a for a in cond.args])
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != full.shape:
        return False
    allowed = m if allowed_polarity else ~m
    r, c = allowed.shape[-2:]
    tril = torch.ones(r, c, dtype=torch.bool, device=allowed.device).tril()
    return bool((allowed.reshape(-1, r, c) == tril).all())


def _has_parameter_ancestor(node: fx.Node, limit: int = 400) -> bool:
    seen: set = set()
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            if _state_kind(n) in ("parameter", "buffer"):
                return True
            continue
        stack.extend(n.all_input_nodes)
    return False


def _bias_reason(term: Any) -> str | None:
    """Why an additive term is not provably a mask, or None when it is one."""
    bad = _not_a_mask(term)
    if bad is None:
        return None
    if isinstance(bad, fx.Node) and bad.op == "placeholder" and _state_kind(bad) == "input":
        return (
            f"additive score bias handed in by the caller ({bad.name} holds values other than "
            "0 and -inf, e.g. a relative position bias): not provably a mask"
        )
    if isinstance(term, fx.Node) and _has_parameter_ancestor(term):
        return (
            "additive score bias derived from parameters or buffers (ALiBi/relative "
            "position): not provably a mask"
        )
    what = bad.name if isinstance(bad, fx.Node) else str(bad)
    return f"additive score bias computed in the graph ({what}): not provably a mask"


# ---------------------------------------------------------------------------
# The chain.
# ---------------------------------------------------------------------------


@dataclass
class _Chain:
    """A candidate before its helper nodes exist (built only for rewritable sites)."""

    pattern: str
    softmax: fx.Node
    pv: fx.Node
    qk: fx.Node
    ndim: int
    q: fx.Node
    q_perm: tuple | None = None
    k: fx.Node | None = None  # k as [.., Nk, D] when it exists in the graph
    k_from: tuple | None = None  # ("transpose", kT) or ("permute", x, perm): build k
    v: fx.Node | None = None
    v_perm: tuple | None = None
    out_einsum: tuple | None = None  # (canonical equation, output permutation) for PV einsum
    scale: list = field(default_factory=list)  # [(op, value)], op "mul" or "div"
    masks: list = field(default_factory=list)  # [("additive"|"allowed"|"blocked", node)]
    interior: list = field(default_factory=list)
    skip: list = field(default_factory=list)
    steps: int = 0  # nodes visited by the backward walk (bounded: masks can be large graphs)


_MAX_STEPS = 256


def _peel_scale(x: Any, factors: list) -> Any:
    """Strip ``mul``/``div`` by scalars from a q or k operand, collecting the factors."""
    for _ in range(8):
        o = _op(x)
        if o is None or o.kind not in ("mul", "div"):
            return x
        lhs, rhs = o.args.get("input"), o.args.get("other")
        if o.kind == "mul" and _is_scalar(lhs) and _is_tensor(rhs):
            lhs, rhs = rhs, lhs
        if not (_is_tensor(lhs) and _is_scalar(rhs)) or _mutated(x, lhs):
            return x
        factors.append((o.kind, rhs))
        x = lhs
    return x


def _untranspose(kt: fx.Node, ndim: int) -> tuple[fx.Node | None, tuple | None]:
    """k ``[.., Nk, D]`` from kᵀ ``[.., D, Nk]``: an existing node, or how to build one."""
    o = _op(kt)
    if o is not None and o.kind == "transpose":
        d0, d1 = _norm_dim(o.args.get("dim0"), ndim), _norm_dim(o.args.get("dim1"), ndim)
        if {d0, d1} == {ndim - 2, ndim - 1}:
            return o.args["input"], None
    if o is not None and o.kind == "permute":
        dims = o.args.get("dims", o.varargs)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        dims = [_norm_dim(d, ndim) for d in dims]
        if len(dims) == ndim and None not in dims:
            perm = list(dims)
            perm[-2], perm[-1] = perm[-1], perm[-2]
            if perm == list(range(ndim)):
                return o.args["input"], None
            return None, ("permute", o.args["input"], tuple(perm))
    if o is not None and o.kind == "getattr" and o.args.get("name") == "mT":
        return o.args["input"], None
    return None, ("transpose", kt)


def unrepeated(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``k`` and ``v`` before a GQA repeat of their heads (the same repeat on both, and
    neither changed in place), else as they are."""
    uk, uv = _unrepeat(k), _unrepeat(v)
    if uk is None or uv is None or not _same(uk[1], uv[1]) or _mutated(k, v):
        return k, v
    return uk[0], uv[0]


def _unrepeat(x: fx.Node) -> tuple[fx.Node, int] | None:
    """The ``[B, Hkv, N, D]`` tensor a GQA repeat made ``[B, Hkv*n, N, D]`` from, and n."""
    shape = node_shape(x)
    if shape is None or len(shape) != 4:
        return None
    o = _op(x)
    if o is None:
        return None
    if o.kind == "repeat_interleave":
        base = o.args.get("input")
        n = node_value(o.args.get("repeats"))
        dim = _norm_dim(o.args.get("dim"), 4)
        bs = node_shape(base)
        if _is_scalar(n) and dim == 1 and bs is not None and len(bs) == 4:
            return base, n
        return None
    if o.kind == "expand":  # MQA-style head broadcast [B, 1, N, D] -> [B, H, N, D]
        base = o.args.get("input")
        bs = node_shape(base)
        if (
            bs is not None
            and len(bs) == 4
            and _same(bs[1], 1)
            and all(_same(bs[i], shape[i]) for i in (0, 2, 3))
        ):
            n = shape[1]
            return base, n
        return None
    if o.kind != "view":
        return None
    # reshape(expand(unsqueeze(k, 2)), [B, Hkv*n, N, D]) (HF repeat_kv), with copies between
    src = o.args.get("input")
    for _ in range(3):
        so = _op(src)
        if so is not None and so.kind == "identity":
            src = so.args.get("input")
    so = _op(src)
    if so is None or so.kind != "expand":
        return None
    es = node_shape(src)
    inner = so.args.get("input")
    ins = node_shape(inner)
    if es is None or ins is None or len(es) != 5 or len(ins) != 5 or not _same(ins[2], 1):
        return None
    if not all(_same(ins[i], es[i]) for i in (0, 1, 3, 4)):
        return None
    # inner must be k with a new axis at 2: unsqueeze(k, 2) or k[:, :, None]
    base = None
    io = _op(inner)
    if io is not None and io.kind == "unsqueeze" and _norm_dim(io.args.get("dim"), 5) == 2:
        base = io.args.get("input")
    elif io is not None and io.kind == "getitem":
        idx = io.args.get("index")
        if (
            isinstance(idx, tuple)
            and idx[:3] == (slice(None), slice(None), None)
            and all(s == slice(None) or s is Ellipsis for s in idx[3:])
        ):
            base = io.args.get("input")
    if base is None:
        return None
    bs = node_shape(base)
    n = es[2]
    if bs is None or len(bs) != 4:
        return None
    if not (_same(bs[0], shape[0]) and _same(bs[2], shape[2]) and _same(bs[3], shape[3])):
        return None
    return base, n


def _parse_einsum(eq: str, ndims: list[int]) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs, out = eq, None
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        return None
    ell = None
    res = []
    for term, nd in zip(ins, ndims, strict=True):
        if "..." in term:
            n_ell = nd - (len(term) - 3)
            ell_letters = "".join(chr(ord("A") + i) for i in range(n_ell))
            ell = ell_letters if ell is None or len(ell_letters) > len(ell) else ell
            term = term.replace("...", ell_letters)
        if len(term) != nd:
            return None
        res.append(term)
    if out is None:
        counts: dict = {}
        for t in res:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        out = (ell or "") + "".join(sorted(c for c, n in counts.items() if n == 1 and c.islower()))
    elif "..." in out:
        out = out.replace("...", ell or "")
    return res, out


def _perm(src: str, dst: str) -> tuple | None:
    p = tuple(src.index(c) for c in dst)
    return None if p == tuple(range(len(p))) else p


def _qk_einsum(eq: str, a: fx.Node, b: fx.Node) -> tuple | None:
    """(ndim, q permutation, k permutation) for a score einsum ``q·kᵀ``, or None."""
    sa, sb = node_shape(a), node_shape(b)
    if sa is None or sb is None:
        return None
    parsed = _parse_einsum(eq, [len(sa), len(sb)])
    if parsed is None:
        return None
    (la, lb), out = parsed
    contracted = [c for c in la if c in lb and c not in out]
    if len(contracted) != 1 or len(out) < 3:
        return None
    d = contracted[0]
    batch, qc, kc = out[:-2], out[-2], out[-1]
    if qc not in la or qc in lb or kc not in lb or kc in la:
        return None
    if set(la) != set(batch) | {qc, d} or set(lb) != set(batch) | {kc, d}:
        return None
    if len(la) != len(out) or len(lb) != len(out):
        return None
    return len(out), _perm(la, batch + qc + d), _perm(lb, batch + kc + d)


def _pv_einsum(eq: str, p: fx.Node, v: fx.Node) -> tuple | None:
    """(v permutation, canonical equation, output permutation) for ``probs·v``, or None."""
    sp, sv = node_shape(p), node_shape(v)
    if sp is None or sv is None:
        return None
    parsed = _parse_einsum(eq, [len(sp), len(sv)])
    if parsed is None:
        return None
    (lp, lv), out = parsed
    batch, qc, kc = lp[:-2], lp[-2], lp[-1]
    if kc not in lv or kc in out or qc not in out or qc in lv:
        return None
    dv = [c for c in lv if c not in lp]
    if len(dv) != 1 or set(lv) != set(batch) | {kc, dv[0]} or set(out) != set(batch) | {qc, dv[0]}:
        return None
    if len(out) != len(lp):
        return None
    canon_out = batch + qc + dv[0]
    v_perm = _perm(lv, batch + kc + dv[0])
    out_perm = _perm(canon_out, out)
    canon_eq = f"{lp},{batch + kc + dv[0]}->{canon_out}"
    return v_perm, canon_eq, out_perm


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = node_shape(a), node_shape(b)
    return (
        sa is not None
        and sb is not None
        and len(sa) == len(sb)
        and all(_same(x, y) for x, y in zip(sa, sb, strict=True))
    )


def _walk_probs(softmax: fx.Node, chain_nodes: list) -> tuple[fx.Node, list] | None:
    """From the softmax forward to the product with v; None if there is none (not attention)."""
    cur = softmax
    skip = []
    for _ in range(8):
        nxt = None
        for u in cur.users:
            o = _op(u)
            if o is None:
                continue
            if o.kind in ("matmul", "bmm") and o.args.get("input") is cur:
                return u, skip
            if (
                o.kind == "einsum"
                and len(o.args.get("operands", ())) == 2
                and o.args["operands"][0] is cur
            ):
                return u, skip
        for u in cur.users:
            o = _op(u)
            if o is None or o.args.get("input") is not cur:
                continue
            if o.kind in ("cast", "identity") or (o.kind == "view" and _same_shape(u, cur)):
                nxt = u  # a view to the same shape (Falcon's ``probs.view(b, h, q, k)``)
                break
            if o.kind == "dropout":
                p, training = o.args.get("p", 0.5), o.args.get("training", True)
                zero = guarded_zero(p)
                p = 0.0 if zero else p
                if training is not False and not (isinstance(p, (int, float)) and p == 0):
                    skip.append(f"dropout on the attention weights in training mode (p={p})")
                nxt = u
                break
        if nxt is None:
            return None
        chain_nodes.append(nxt)
        cur = nxt
    return None


def _walk_scores(x: Any, ch: _Chain, depth: int = 0) -> fx.Node | None:
    """From the softmax input back to the score product, recording scale, masks and reasons.

    Returns the score product node (``matmul``/``bmm``/``baddbmm``/``einsum`` of two
    activations), or None when the softmax input does not come from one.
    """
    ch.steps += 1
    if not isinstance(x, fx.Node) or depth > 16 or ch.steps > _MAX_STEPS:
        return None
    o = _op(x)
    if o is None:
        return None
    a = o.args
    k = o.kind
    if k in ("matmul", "bmm", "baddbmm"):
        return x
    if k == "einsum":
        return x if len(a.get("operands", ())) == 2 else None

    def through(nxt, scale=None, mask=None, skip=None):
        mark = (len(ch.scale), len(ch.masks), len(ch.skip), len(ch.interior))
        if scale is not None:
            ch.scale.append(scale)
        if mask is not None:
            ch.masks.append(mask)
        if skip is not None:
            ch.skip.append(skip)
        ch.interior.append(x)
        found = _walk_scores(nxt, ch, depth + 1)
        if found is None:  # undo
            del ch.scale[mark[0] :], ch.masks[mark[1] :], ch.skip[mark[2] :], ch.interior[mark[3] :]
        return found

    if k in ("cast", "identity"):
        return through(a.get("input"))
    if k == "view" and isinstance(a.get("input"), fx.Node) and _same_shape(x, a["input"]):
        return through(a.get("input"))  # Falcon's ``scores.view(b, h, q, k)`` of its own shape
    if k in ("mul", "div"):
        lhs, rhs = a.get("input"), a.get("other")
        if k == "mul" and _is_scalar(lhs) and _is_tensor(rhs):
            lhs, rhs = rhs, lhs
        if _is_tensor(lhs) and _is_scalar(rhs):
            return through(lhs, scale=(k, rhs))
        if _is_tensor(lhs) and _is_tensor(rhs):
            rv = node_value(rhs)
            why = (
                "scores scaled by a tensor (a learned or computed temperature)"
                if rv.numel() == 1
                else "scores multiplied by a tensor (not a mask)"
            )
            found = through(lhs, skip=why)
            if found is None and k == "mul":
                found = through(rhs, skip=why)
            return found
        return None
    if k == "add":
        lhs, rhs = a.get("input"), a.get("other")
        if not (_is_tensor(lhs) and isinstance(rhs, (fx.Node, int, float))):
            return None
        if a.get("alpha", 1) != 1:
            return None
        if isinstance(rhs, (int, float)) and math.isfinite(rhs):
            # the same number added to every score (DeBERTa's ``scores + 0`` when it has no
            # relative attention): the softmax does not see it
            return through(lhs)
        for chain_side, term in ((lhs, rhs), (rhs, lhs)):
            if not _is_tensor(chain_side):
                continue
            found = through(chain_side, mask=("additive", term))
            if found is not None:
                return found
        return None
    if k == "masked_fill":
        val, cond = a.get("value"), a.get("mask")
        if _blocks_by_replacing(val):
            return through(a.get("input"), mask=("blocked", cond))
        if _blocks(val):
            return through(a.get("input"), skip=_finite_fill_reason(val))
        return through(a.get("input"), skip=f"masked_fill with {val!r} (not a blocking value)")
    if k == "where":
        cond, lhs, rhs = a.get("condition"), a.get("input"), a.get("other")
        if _blocks_by_replacing(rhs) and _is_tensor(lhs):
            return through(lhs, mask=("allowed", cond))
        if _blocks_by_replacing(lhs) and _is_tensor(rhs):
            return through(rhs, mask=("blocked", cond))
        if _blocks(rhs) and _is_tensor(lhs):
            return through(lhs, skip=_finite_fill_reason(rhs))
        if _blocks(lhs) and _is_tensor(rhs):
            return through(rhs, skip=_finite_fill_reason(lhs))
        for side in (lhs, rhs):
            if _is_tensor(side):
                found = through(side, skip="where() that does not block with -inf/finfo.min")
                if found is not None:
                    return found
        return None
    if k == "tanh":
        return through(a.get("input"), skip="logit soft-capping (tanh) between scores and softmax")
    return None


# the steps `_walk_scores` reads between the score product and the softmax
_READ_SCORES = {"cast", "identity", "mul", "div", "add", "masked_fill", "where", "tanh"}
# and between the softmax and the product with v
_READ_PROBS = {"cast", "identity", "dropout"}


def _step_label(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        label = f"Tensor.{t}"
    else:
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", None) or str(t)
        label = (f"torch.{name}" if mod.startswith("torch") else
                 f"operator.{name}" if mod == "_operator" else name)
    o = _op(node)
    if o is not None and o.kind == "view":
        label += " to another shape"
    return label


def _is_product(node: fx.Node) -> bool:
    o = _op(node)
    return o is not None and (o.kind in ("matmul", "bmm", "baddbmm") or (
        o.kind == "einsum" and len(o.args.get("operands", ())) == 2))


def _unread(path: list, read: set) -> list[str]:
    """Labels of the steps of ``path`` the walks do not read (a view that keeps the
    shape is read), in order, without repeats."""
    out: list[str] = []
    for step in path:
        o = _op(step)
        if o is not None and (o.kind in read or (o.kind == "view" and _same_shape(
                step, o.args.get("input")))):
            continue
        label = _step_label(step)
        if label not in out:
            out.append(label)
    return out


def _unread_scores(x: Any, limit: int = 12) -> tuple[fx.Node, list[str]] | None:
    """When the softmax input comes from a product of two activations through steps the
    walk does not read: that product and the unread steps (from the softmax side).

    Breadth-first from the softmax input through tensor arguments, at most ``limit``
    nodes deep; None when no score product is that close (then the softmax is not
    taken for attention).
    """
    if not isinstance(x, fx.Node):
        return None
    parent: dict[fx.Node, fx.Node | None] = {x: None}
    frontier = [x]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            if _is_product(n):
                path, cur = [], parent[n]
                while cur is not None:
                    path.append(cur)
                    cur = parent[cur]
                steps = _unread(list(reversed(path)), _READ_SCORES)
                return (n, steps) if steps else None
            for a in (*n.args, *n.kwargs.values()):
                for b in (a if isinstance(a, (list, tuple)) else (a,)):
                    if isinstance(b, fx.Node) and b.op != "get_attr" and b not in parent:
                        parent[b] = n
                        nxt.append(b)
        frontier = nxt
    return None


def _unread_probs(softmax: fx.Node, limit: int = 8) -> tuple[fx.Node, list[str]] | None:
    """The product with v the attention weights reach through steps `_walk_probs` does
    not read, and those steps; None when no product takes them as its first operand."""
    parent: dict[fx.Node, fx.Node | None] = {softmax: None}
    frontier = [softmax]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in parent:
                    continue
                parent[u] = n
                o = _op(u)
                first = None
                if o is not None and o.kind in ("matmul", "bmm"):
                    first = o.args.get("input")
                elif o is not None and o.kind == "einsum" and len(o.args.get("operands", ())) == 2:
                    first = o.args["operands"][0]
                if first is n:
                    path, cur = [], n
                    while cur is not softmax:
                        path.append(cur)
                        cur = parent[cur]
                    return u, _unread(list(reversed(path)), _READ_PROBS)
                nxt.append(u)
        frontier = nxt
    return None


def _finite_fill_reason(val: Any) -> str:
    return (f"scores overwritten with the finite value {_const(val)!r}: keys it blocks take "
            f"weight once logits reach its size, which the rewrite cannot check (use -inf "
            f"or finfo.min)")


def _scores_chain(softmax: fx.Node) -> _Chain | None:
    """The attention around one softmax, or None when it is not attention."""
    so = _op(softmax)
    x = so.args.get("input")
    xs = node_shape(x)
    if xs is None or len(xs) not in (3, 4):
        return None
    dim = _norm_dim(so.args.get("dim"), len(xs))
    if dim != len(xs) - 1:
        return None
    probs_nodes: list = []
    walked = _walk_probs(softmax, probs_nodes)
    probs_unread = walked is None
    if walked is None:
        found = _unread_probs(softmax)
        if found is None:
            return None
        pv, steps = found
        walked = pv, [f"{', '.join(steps[:3])} between the softmax and the product with v "
                      "(the rewrite reads casts, dropout and views that keep the shape there)"]
    pv, probs_skip = walked
    ch = _Chain(pattern="eager", softmax=softmax, pv=pv, qk=softmax, ndim=len(xs), q=softmax)
    qk = _walk_scores(x, ch)
    if qk is None:
        # softmax(product of two activations ... ) . v with a step in between the rewrite
        # does not read: attention it cannot prove equal to the op's; reported, left exact
        unread = _unread_scores(x)
        if unread is None:
            return None
        qk, steps = unread
        qo = _op(qk)
        ops = qo.args["operands"] if qo.kind == "einsum" else (qo.args.get("input"), qo.args.get("other"))
        if not all(isinstance(t, fx.Node) for t in ops):
            return None
        po = _op(pv)
        v = po.args["operands"][1] if po.kind == "einsum" else po.args.get("other")
        ch.qk, ch.q, ch.k, ch.v = qk, ops[0], ops[1], v if isinstance(v, fx.Node) else ops[1]
        ch.ndim = len(node_shape(ch.q) or xs)
        ch.pattern = {"bmm": "bmm", "baddbmm": "bmm", "einsum": "einsum"}.get(qo.kind, "eager")
        ch.skip = [f"{', '.join(steps[:3])} between the scores and the softmax (the rewrite "
                   "reads scales, masks, casts and views that keep the shape there)", *probs_skip]
        ch.interior = []
        return ch
    ch.qk = qk
    ch.skip.extend(probs_skip)
    ch.interior = [qk, *reversed(ch.interior), softmax, *probs_nodes]
    qo = _op(qk)
    if qo.kind == "einsum":
        ops = qo.args["operands"]
        e = _qk_einsum(qo.args["equation"], ops[0], ops[1])
        if e is None or e[0] not in (3, 4):
            return None
        ch.pattern = "einsum"
        ch.ndim, ch.q_perm, k_perm = e
        ch.q = _peel_scale(ops[0], ch.scale)
        kk = _peel_scale(ops[1], ch.scale)
        if k_perm is None:
            ch.k = kk
        else:
            ch.k_from = ("permute", kk, k_perm)
    else:
        q, kt = qo.args.get("input"), qo.args.get("other")
        qs, kts = node_shape(q), node_shape(kt)
        if qs is None or kts is None or len(qs) != len(kts) or len(qs) not in (3, 4):
            return None
        ch.ndim = len(qs)
        if qo.kind in ("bmm", "baddbmm"):
            ch.pattern = "bmm"
        if qo.kind == "baddbmm":
            if _const(qo.args.get("beta", 1)) != 1.0:
                ch.skip.append("baddbmm with beta != 1")
            alpha = qo.args.get("alpha", 1)
            if _const(alpha) != 1.0:
                if _is_scalar(alpha):
                    ch.scale.append(("mul", alpha))
                else:
                    ch.skip.append("baddbmm alpha is not a scalar")
            ch.masks.append(("additive", qo.args.get("bias")))
        ch.q = _peel_scale(q, ch.scale)
        kt = _peel_scale(kt, ch.scale)
        k, k_from = _untranspose(kt, ch.ndim)
        if k is not None:
            ch.k = _peel_scale(k, ch.scale)
        else:
            ch.k_from = k_from
    po = _op(pv)
    if po.kind == "einsum":
        ops = po.args["operands"]
        e = _pv_einsum(po.args["equation"], ops[0], ops[1])
        if e is None:
            return None
        ch.v_perm, canon_eq, out_perm = e
        ch.v = ops[1]
        if out_perm is not None:
            ch.out_einsum = (canon_eq, out_perm)
        if ch.pattern != "einsum":
            ch.pattern = "einsum"
    else:
        ch.v = po.args.get("other")
        vs = node_shape(ch.v)
        if vs is None or len(vs) != ch.ndim:
            # a product whose v is shaped otherwise: attention only when the weights were
            # reshaped on the way to it, and then reported as such (skipped)
            return ch if probs_unread else None
    return ch


def _check_shapes(ch: _Chain) -> str | None:
    """Why q/k/v do not fit the op's ``[B, H, N, D]`` / ``[B, Hkv, N, D]`` layout, or None."""
    qs = _permuted(node_shape(ch.q), ch.q_perm)
    if ch.k is not None:
        ks = node_shape(ch.k)
    elif ch.k_from[0] == "permute":
        ks = _permuted(node_shape(ch.k_from[1]), ch.k_from[2])
    else:
        s = node_shape(ch.k_from[1])
        ks = None if s is None else (*s[:-2], s[-1], s[-2])
    vs = _permuted(node_shape(ch.v), ch.v_perm)
    if qs is None or ks is None or vs is None:
        return "q/k/v shapes unknown in the captured graph"
    if not (len(qs) == len(ks) == len(vs) == ch.ndim):
        return f"q/k/v ranks differ ({len(qs)}, {len(ks)}, {len(vs)})"
    if not _same(qs[-1], ks[-1]):
        return "q and k head dims differ"
    if not _same(ks[-2], vs[-2]):
        return "k and v lengths differ"
    for i in range(ch.ndim - 2):
        if i == ch.ndim - 3 and ch.ndim == 4:
            continue  # the head axis may be shared (GQA) and is checked below
        if not (_same(qs[i], ks[i]) and _same(qs[i], vs[i])):
            return "q and k/v batch sizes differ (broadcast over the batch)"
    if ch.ndim == 4:
        h, hk, hv = _int(qs[1]), _int(ks[1]), _int(vs[1])
        if not _same(ks[1], vs[1]):
            return "k and v head counts differ"
        if not _same(qs[1], ks[1]):
            if h is None or hk is None or hv is None:
                return "head counts are symbolic"
            if h % hk:
                return "query heads not a multiple of key/value heads"
    return None


def _permuted(shape, perm):
    if shape is None or perm is None:
        return shape
    return tuple(shape[i] for i in perm)


# ---------------------------------------------------------------------------
# Building the match: helper nodes only for sites that will be rewritten.
# ---------------------------------------------------------------------------


def _meta_key(graph: fx.Graph) -> str:
    for n in graph.nodes:
        if "val" in n.meta:
            return "val"
        if "example_value" in n.meta:
            return "example_value"
    return "val"


def _fake_mode(values):
    """The fake mode of the graph's example values (not the tracing context's, which may differ)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def _emit(graph: fx.Graph, like: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
    """Insert a helper node (before the current insertion point) with its example value."""
    kwargs = kwargs or {}
    node = graph.create_node(op, target, tuple(args), kwargs)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    vals = fx.node.map_arg((tuple(args), kwargs), node_value)
    flat = list(torch.utils._pytree.tree_leaves(vals))
    fake = _fake_mode(flat)
    if fake is not None or not any(isinstance(v, torch.Tensor) for v in flat):
        ctx = fake if fake is not None else contextlib.nullcontext()
        fn = getattr(torch.Tensor, target) if op == "call_method" else target
        # Meta only feeds the report and later passes; a helper whose example value cannot
        # be computed still runs correctly, so a failure here leaves the meta empty.
        try:
            with ctx:
                node.meta[_meta_key(graph)] = fn(*vals[0], **vals[1])
        except Exception:  # noqa: BLE001
            pass
    return node


def _materialize(gm: fx.GraphModule, ch: _Chain) -> tuple:
    """Create the helper nodes a rewritable chain needs; return (q, k, v, mask, scale,
    is_causal)."""
    graph = gm.graph
    pv = ch.pv
    with graph.inserting_before(pv):
        q = ch.q
        if ch.q_perm is not None:
            q = _emit(graph, pv, "call_function", torch.permute, (q, ch.q_perm))
        k = ch.k
        if k is None:
            if ch.k_from[0] == "permute":
                k = _emit(graph, pv, "call_function", torch.permute, (ch.k_from[1], ch.k_from[2]))
            else:
                k = _emit(graph, pv, "call_function", torch.transpose, (ch.k_from[1], -2, -1))
        v = ch.v
        if ch.v_perm is not None:
            v = _emit(graph, pv, "call_function", torch.permute, (v, ch.v_perm))
        if ch.ndim == 4:  # GQA: hand the op the un-repeated k and v
            k, v = unrepeated(k, v)
        is_causal = _only_causal_mask(ch)
        mask = None if is_causal else _combine_masks(graph, pv, ch.masks)
        scale = _combine_scale(graph, pv, ch.scale)
    return q, k, v, mask, scale, is_causal


def _only_causal_mask(ch: _Chain) -> bool:
    """The chain's one mask is a causal buffer slice (nanoGPT): pass ``is_causal`` instead."""
    if len(ch.masks) != 1 or ch.masks[0][0] == "additive":
        return False
    kind, cond = ch.masks[0]
    return _causal_buffer(cond, kind == "allowed", ch.qk)


def _combine_masks(graph: fx.Graph, like: fx.Node, masks: list) -> fx.Node | None:
    allowed: list = []
    additive: list = []
    for kind, node in masks:
        if kind == "additive":
            if isinstance(node, fx.Node):  # a number added to every score changes nothing
                additive.append(node)
            continue
        if kind == "blocked":
            o = _op(node)
            if o is not None and o.kind == "not" and _dtype(o.args.get("input")) == torch.bool:
                node = o.args["input"]
            else:
                node = _emit(graph, like, "call_function", torch.logical_not, (node,))
        allowed.append(node)
    mask_add = None
    for m in additive:
        mask_add = (
            m
            if mask_add is None
            else _emit(graph, like, "call_function", operator.add, (mask_add, m))
        )
    mask_bool = None
    for m in allowed:
        mask_bool = (
            m
            if mask_bool is None
            else _emit(graph, like, "call_function", torch.logical_and, (mask_bool, m))
        )
    if mask_add is None:
        return mask_bool
    if mask_bool is None:
        return mask_add
    blocked = _emit(graph, like, "call_function", torch.logical_not, (mask_bool,))
    return _emit(
        graph, like, "call_function", torch.masked_fill, (mask_add, blocked, float("-inf"))
    )


def _combine_scale(graph: fx.Graph, like: fx.Node, factors: list) -> Any:
    const = 1.0
    nodes = []
    for op, f in factors:
        c = _const(f) if not isinstance(node_value(f), (torch.SymInt, torch.SymFloat)) else None
        if c is not None:
            const = const * c if op == "mul" else const / c
        else:
            nodes.append((op, f))
    scale: Any = const
    for op, f in nodes:
        fn = operator.mul if op == "mul" else operator.truediv
        scale = _emit(graph, like, "call_function", fn, (scale, f))
    return scale


def _canonical_pv(gm: fx.GraphModule, ch: _Chain) -> fx.Node:
    """For a ``probs·v`` einsum with a non-``[B, H, Nq, Dv]`` output: split off the permute."""
    graph = gm.graph
    pv = ch.pv
    eq, out_perm = ch.out_einsum
    po = _op(pv)
    with graph.inserting_before(pv):
        core = _emit(graph, pv, "call_function", torch.einsum, (eq, *po.args["operands"]))
        out = _emit(graph, pv, "call_function", torch.permute, (core, out_perm))
    pv.replace_all_uses_with(out)
    graph.erase_node(pv)
    ch.interior = [n for n in ch.interior if n is not pv]
    return core


def _live_nodes(graph: fx.Graph) -> set:
    """Nodes the graph's result (or a side effect) depends on; other uses are dead code
    (torch.export keeps, e.g., the unused average of nn.MultiheadAttention's weights)."""
    roots = [n for n in graph.nodes if n.op == "output" or _is_inplace(n) or n.is_impure()]
    live: set = set()
    while roots:
        n = roots.pop()
        if n not in live:
            live.add(n)
            roots.extend(n.all_input_nodes)
    return live


def _outside_uses(ch: _Chain, live: set) -> list:
    """Users of the chain's interior outside it, not counting dead code and metadata asserts."""
    inside = set(ch.interior) | {ch.pv}
    return [
        u
        for n in ch.interior
        for u in n.users
        if u not in inside and u in live and not _is_assert(u)
    ]


def _drop_dead_uses(graph: fx.Graph, ch: _Chain, live: set) -> None:
    """Erase the dead code and asserts hanging off the chain, which would keep it alive."""
    inside = set(ch.interior) | {ch.pv}
    doomed: set = set()
    stack = [u for n in ch.interior for u in n.users if u not in inside]
    while stack:
        u = stack.pop()
        if u not in doomed and (u not in live or _is_assert(u)):
            doomed.add(u)
            stack.extend(u.users)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for u in sorted(doomed, key=order.__getitem__, reverse=True):
        graph.erase_node(u)


def _skip_reason(ch: _Chain, live: set) -> str | None:
    if ch.skip:
        return ch.skip[0]
    for kind, node in ch.masks:
        if kind == "additive":
            why = _bias_reason(node)
            if why is not None:
                return why
    why = _check_shapes(ch)
    if why is not None:
        return why
    vq, vo = node_value(ch.q), node_value(ch.pv)
    if isinstance(vq, torch.Tensor) and isinstance(vo, torch.Tensor) and vq.dtype != vo.dtype:
        return f"attention output dtype {vo.dtype} differs from the query's {vq.dtype}"
    esc = list(dict.fromkeys(n for n in ch.interior for u in _outside_uses(ch, live)
                             if u in n.users))  # fmt: skip
    if esc:
        names = ", ".join(n.name for n in esc[:3])
        return (
            f"intermediate result(s) {names} of the attention are used elsewhere "
            "(attention weights returned or stored, or modified in place)"
        )
    return None


def _mask_kind(masks: list, is_causal: bool = False, bias: bool = False) -> str:
    """``none``, ``causal`` (proven), ``dense-bool``/``dense-additive`` (read at run time),
    or ``bias`` (an additive term that is not provably a mask)."""
    if bias:
        return "bias"
    if is_causal:
        return "causal"
    if not masks:
        return "none"
    return "dense-additive" if any(k == "additive" for k, _ in masks) else "dense-bool"


# ---------------------------------------------------------------------------
# nn.MultiheadAttention: Dynamo keeps F.multi_head_attention_forward as one call.
# ---------------------------------------------------------------------------

_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


def mha_in_projection(
    query,
    key,
    value,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
):
    """In-projection of ``nn.MultiheadAttention``: ``[L, B, E]`` inputs to ``[B, H, L, D]``.

    Equal to ``F._in_projection_packed`` / ``F._in_projection`` followed by the
    head split of ``F.multi_head_attention_forward``.
    """
    if q_proj_weight is None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)

    def heads(x):
        n, b, e = x.shape
        return x.reshape(n, b, num_heads, e // num_heads).permute(1, 2, 0, 3)

    return (
        heads(F.linear(query, w_q, b_q)),
        heads(F.linear(key, w_k, b_k)),
        heads(F.linear(value, w_v, b_v)),
    )


def mha_mask(attn_mask, key_padding_mask, query, num_heads):
    """The additive ``[B|1, H|1, L, S]`` mask of ``F.multi_head_attention_forward``.

    Bool masks (True = masked) become ``-inf``; a 3-D ``attn_mask`` is ``[B*H, L, S]``;
    ``query`` (``[L, B, E]``) gives the batch size and the dtype.
    """
    batch, dtype = query.shape[1], query.dtype

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
        return m.to(dtype)

    out = None
    if attn_mask is not None:
        m = additive(attn_mask)
        out = (
            m[None, None] if m.dim() == 2 else m.reshape(batch, num_heads, m.shape[-2], m.shape[-1])
        )
    if key_padding_mask is not None:
        kp = additive(key_padding_mask)
        kp = kp.reshape(kp.shape[0], 1, 1, kp.shape[-1])
        out = kp if out is None else out + kp
    return out


def mha_out_projection(attn, out_proj_weight, out_proj_bias):
    """``[B, H, L, D]`` attention to the ``[L, B, E]`` output of ``nn.MultiheadAttention``."""
    b, h, n, d = attn.shape
    x = attn.permute(2, 0, 1, 3).reshape(n * b, h * d)
    return F.linear(x, out_proj_weight, out_proj_bias).reshape(n, b, h * d)


def _find_mha(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> AttentionMatch:
    bound = _MHA_SIG.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    path = module_path(node)

    def skipped(reason: str) -> AttentionMatch:
        return AttentionMatch(
            pattern="mha",
            output=node,
            q=query,
            k=key,
            v=value,
            mask=a["attn_mask"],
            module_path=path,
            skip_reason=reason,
            mask_kind=mask_kind_of(a["attn_mask"], a["is_causal"]),
        )

    users = list(node.users)
    getters = {}
    for u in users:
        if u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1):
            getters[u.args[1]] = u
        else:
            return skipped("the result of multi_head_attention_forward is used as a tuple")
    if a["need_weights"] is not False and 1 in getters and getters[1].users:
        return skipped(
            "nn.MultiheadAttention returns its attention weights (need_weights=True) "
            "and they are used: the softmax must stay exact"
        )
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] is not False:
        return skipped("nn.MultiheadAttention with add_bias_kv or add_zero_attn")
    if a["static_k"] is not None or a["static_v"] is not None:
        return skipped("nn.MultiheadAttention with static_k/static_v")
    if a["training"] is not False and _const(a["dropout_p"]) != 0.0 \
            and not guarded_zero(a["dropout_p"]):
        return skipped("dropout on the attention weights in training mode")
    qs = node_shape(query)
    if qs is None or len(qs) != 3:
        return skipped("unbatched (2-D) nn.MultiheadAttention input")
    if not isinstance(a["num_heads"], int) or not isinstance(a["embed_dim_to_check"], int):
        return skipped("head count or embedding size is not a constant")
    heads = a["num_heads"]
    head_dim = a["embed_dim_to_check"] // heads
    is_causal = a["is_causal"] is True
    attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
    if is_causal and kpm is None and a["need_weights"] is False:
        attn_mask = None  # F.multi_head_attention_forward hands SDPA is_causal alone
    else:
        is_causal = False

    graph = gm.graph
    out0 = getters.get(0)
    with graph.inserting_before(node):
        sep = a["use_separate_proj_weight"] is True
        proj = _emit(
            graph,
            node,
            "call_function",
            mha_in_projection,
            (
                query,
                key,
                value,
                heads,
                a["in_proj_weight"],
                a["in_proj_bias"],
                a["q_proj_weight"] if sep else None,
                a["k_proj_weight"] if sep else None,
                a["v_proj_weight"] if sep else None,
            ),
        )
        q, k, v = (
            _emit(graph, node, "call_function", operator.getitem, (proj, i)) for i in range(3)
        )
        mask = None
        if attn_mask is not None or kpm is not None:
            mask = _emit(
                graph,
                node,
                "call_function",
                mha_mask,
                (attn_mask, kpm, query, heads),
            )
        scale = 1.0 / math.sqrt(head_dim)
        core = _emit(
            graph,
            node,
            "call_function",
            F.scaled_dot_product_attention,
            (q, k, v),
            {"attn_mask": mask, "is_causal": is_causal, "scale": scale},
        )
        out = _emit(
            graph,
            node,
            "call_function",
            mha_out_projection,
            (core, a["out_proj_weight"], a["out_proj_bias"]),
        )
    if out0 is not None:
        out0.replace_all_uses_with(out)
        graph.erase_node(out0)
    if 1 in getters:
        graph.erase_node(getters[1])
    graph.erase_node(node)
    return AttentionMatch(
        pattern="mha",
        output=core,
        q=q,
        k=k,
        v=v,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        interior=[],
        module_path=path,
        mask_kind="dense-additive" if mask is not None else ("causal" if is_causal else "none"),
    )


# nn.TransformerEncoderLayer's fast path (eval, no grad) is one fused call.

_TEL_ARGS = (
    "src", "embed_dim", "num_heads", "in_proj_weight", "in_proj_bias", "out_proj_weight",
    "out_proj_bias", "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1",
    "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2",
    "mask", "mask_type",
)  # fmt: skip


def encoder_layer_qkv(src, num_heads, in_proj_weight, in_proj_bias, norm_first, eps, w1, b1):
    """q, k, v ``[B, H, L, D]`` of a batch-first ``nn.TransformerEncoderLayer``."""
    x = F.layer_norm(src, (src.shape[-1],), w1, b1, eps) if norm_first else src
    x = x.transpose(0, 1)
    return mha_in_projection(x, x, x, num_heads, in_proj_weight, in_proj_bias)


def encoder_layer_mask(mask, mask_type, num_heads, src):
    """The fused layer's mask (type 0 ``[L, S]``, 1 ``[B, S]``, 2 ``[B, H, L, S]``; bool
    True = masked) as an additive ``[B|1, H|1, L, S]`` mask."""
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=src.dtype).masked_fill(mask, float("-inf"))
    mask = mask.to(src.dtype)
    if mask_type == 1:
        return mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
    if mask.dim() == 2:
        return mask[None, None]
    return mask


def encoder_layer_rest(src, attn, out_proj_weight, out_proj_bias, use_gelu, norm_first, eps,
                       w1, b1, w2, b2, ffn_w1, ffn_b1, ffn_w2, ffn_b2):  # fmt: skip
    """Everything of the fused layer after attention: out-projection, residuals, norms, FFN."""
    b, h, n, d = attn.shape
    sa = F.linear(attn.permute(0, 2, 1, 3).reshape(b, n, h * d), out_proj_weight, out_proj_bias)
    act = F.gelu if use_gelu else F.relu
    e = (src.shape[-1],)
    if norm_first:
        x = src + sa
        y = F.layer_norm(x, e, w2, b2, eps)
        return x + F.linear(act(F.linear(y, ffn_w1, ffn_b1)), ffn_w2, ffn_b2)
    x = F.layer_norm(src + sa, e, w1, b1, eps)
    return F.layer_norm(x + F.linear(act(F.linear(x, ffn_w1, ffn_b1)), ffn_w2, ffn_b2), e, w2, b2,
                        eps)  # fmt: skip


def _find_encoder_layer(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> AttentionMatch:
    a = dict(zip(_TEL_ARGS, node.args, strict=False))
    a.update(node.kwargs)
    path = module_path(node)
    src = a["src"]
    ss = node_shape(src)
    if ss is None or len(ss) != 3 or not isinstance(a["num_heads"], int):
        return AttentionMatch(
            pattern="mha",
            output=node,
            q=src,
            k=src,
            v=src,
            module_path=path,
            skip_reason="fused encoder layer on an input that is not [B, N, E]",
        )
    heads = a["num_heads"]
    head_dim = a["embed_dim"] // heads
    graph = gm.graph
    with graph.inserting_before(node):
        proj = _emit(graph, node, "call_function", encoder_layer_qkv,
                     (src, heads, a["in_proj_weight"], a["in_proj_bias"], a["norm_first"],
                      a["eps"], a["norm_weight_1"], a["norm_bias_1"]))  # fmt: skip
        q, k, v = (_emit(graph, node, "call_function", operator.getitem, (proj, i))
                   for i in range(3))  # fmt: skip
        mask = None
        if a["mask"] is not None:
            mask = _emit(graph, node, "call_function", encoder_layer_mask,
                         (a["mask"], a["mask_type"], heads, src))  # fmt: skip
        scale = 1.0 / math.sqrt(head_dim)
        core = _emit(graph, node, "call_function", F.scaled_dot_product_attention, (q, k, v),
                     {"attn_mask": mask, "scale": scale})  # fmt: skip
        out = _emit(graph, node, "call_function", encoder_layer_rest,
                    (src, core, a["out_proj_weight"], a["out_proj_bias"], a["use_gelu"],
                     a["norm_first"], a["eps"], a["norm_weight_1"], a["norm_bias_1"],
                     a["norm_weight_2"], a["norm_bias_2"], a["ffn_weight_1"], a["ffn_bias_1"],
                     a["ffn_weight_2"], a["ffn_bias_2"]))  # fmt: skip
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return AttentionMatch(pattern="mha", output=core, q=q, k=k, v=v, mask=mask, scale=scale,
                          module_path=path,
                          mask_kind="dense-additive" if mask is not None else "none")  # fmt: skip


# ---------------------------------------------------------------------------
# The pass.
# ---------------------------------------------------------------------------


def _purify_interior(ch: _Chain) -> None:
    """In-place operators on the chain's own intermediates become pure, so that the
    rewrite's dead-code elimination (which keeps in-place calls) drops the chain."""
    inside = set(ch.interior)
    for n in ch.interior:
        if n.op == "call_function" and n.target in _INPLACE_TO_PURE and n.args[0] in inside:
            n.target = _INPLACE_TO_PURE[n.target]


def _is_softmax(node: fx.Node) -> bool:
    o = _op(node)
    return o is not None and o.kind == "softmax"


def find_eager(gm: fx.GraphModule, ctx: PassContext) -> list[AttentionMatch]:
    """Every hand-written attention in ``gm``, with the reason when it must stay exact.

    Rewritable matches get their helper nodes (transposed/permuted operands, the
    allowed mask, the combined scale) inserted before the attention output;
    skipped matches change nothing in the graph.
    """
    matches: list[AttentionMatch] = []
    for node in list(gm.graph.nodes):
        if node._erased:  # replaced while rewriting an earlier match
            continue
        if node.op == "call_function" and node.target is F.multi_head_attention_forward:
            matches.append(_find_mha(gm, node, ctx))
            ctx.count("found_mha")
            continue
        if node.op == "call_function" and node.target is torch._transformer_encoder_layer_fwd:
            matches.append(_find_encoder_layer(gm, node, ctx))
            ctx.count("found_mha")
            continue
        if not _is_softmax(node):
            continue
        ch = _scores_chain(node)
        if ch is None:
            continue
        ctx.count(f"found_{ch.pattern}")
        live = _live_nodes(gm.graph)
        reason = _skip_reason(ch, live)
        path = module_path(ch.pv) or module_path(node)
        if reason is not None:
            m = AttentionMatch(
                pattern=ch.pattern,
                output=ch.pv,
                q=ch.q,
                k=ch.k if ch.k is not None else ch.k_from[1],
                v=ch.v,
                interior=ch.interior,
                skip_reason=reason,
                module_path=path,
                view_4d=ch.ndim == 3,
                mask_kind=_mask_kind(ch.masks, bias=reason.startswith("additive score bias")),
            )
            matches.append(m)
            continue
        _purify_interior(ch)
        if ch.out_einsum is not None:
            ch.pv = _canonical_pv(gm, ch)
        _drop_dead_uses(gm.graph, ch, live)
        q, k, v, mask, scale, is_causal = _materialize(gm, ch)
        matches.append(
            AttentionMatch(
                pattern=ch.pattern,
                output=ch.pv,
                q=q,
                k=k,
                v=v,
                mask=mask,
                scale=scale,
                is_causal=is_causal,
                interior=ch.interior,
                mask_kind=_mask_kind(ch.masks, is_causal),
                module_path=path,
                view_4d=ch.ndim == 3,
            )
        )
    return matches


__all__ = [
    "find_eager",
    "mha_in_projection",
    "mha_mask",
    "mha_out_projection",
    "encoder_layer_qkv",
    "encoder_layer_mask",
    "encoder_layer_rest",
]
