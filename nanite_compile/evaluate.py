"""Quality and speed measurements on any causal language model.

Pure PyTorch: the model only has to map ``input_ids`` ``[B, N]`` to logits
``[B, N, V]``, either as a tensor or as an output object with ``.logits``
(every Hugging Face ``*ForCausalLM``, converted or not).

- :func:`perplexity`: perplexity of the next-token predictions of one forward
  (or of chunks continuing the model's KV cache), overall and per range of
  token positions (e.g. the first and second 2k tokens, to see how quality
  holds up far from the start).
- :func:`time_forward`, :func:`time_forwards`: wall-clock time of the forward
  pass, of one model or of several measured alternately.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class RangePerplexity:
    """Perplexity over the predictions of tokens ``start .. end - 1``.

    Attributes:
        start: first token position predicted (position 0 is never predicted).
        end: one past the last token position predicted.
        n_tokens: number of predicted tokens (times the batch size).
        nll: mean negative log-likelihood in nats.
        ppl: ``exp(nll)``.
    """

    start: int
    end: int
    n_tokens: int
    nll: float
    ppl: float


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over all predicted tokens, plus the requested ranges.

    Attributes:
        ppl: ``exp(nll)`` over the ``n_tokens`` predictions of positions ``1 .. N-1``.
        nll: mean negative log-likelihood in nats.
        n_tokens: number of predicted tokens, ``B * (N - 1)``.
        ranges: one entry per requested range, in the order given.
    """

    ppl: float
    nll: float
    n_tokens: int
    ranges: list[RangePerplexity] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "nll": self.nll,
            "n_tokens": self.n_tokens,
            "ranges": [vars(r) for r in self.ranges],
        }


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated forward passes, in seconds (warm-up excluded)."""

    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    def to_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "times_s": list(self.times_s)}


def _check_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"input_ids must hold integer token ids (int64), got dtype {input_ids.dtype}"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N] or [B, N], got shape {tuple(input_ids.shape)}")
    return input_ids


def forward_takes(model: nn.Module, name: str, annotated: str | None = None) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (False when it has no signature);
    with ``annotated``, only if that word is in the parameter's type annotation. A
    ``torch.compile`` wrapper (whose forward takes ``*args, **kwargs``) answers for the
    module it compiled."""
    model = getattr(model, "_orig_mod", model)
    try:
        param = inspect.signature(model.forward).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and (annotated is None or annotated in str(param.annotation))


def cache_kwarg(model: nn.Module) -> str:
    """The name ``model``'s forward gives its cache: ``cache`` from transformers 5.2x,
    ``past_key_values`` before (5.17 still had it, without the newer name)."""
    if forward_takes(model, "cache") or not forward_takes(model, "past_key_values"):
        return "cache"
    return "past_key_values"


def _forward_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` where the model takes it: a scoring pass needs no KV cache."""
    return {"use_cache": False} if forward_takes(model, "use_cache") else {}


def logits_of(model: nn.Module, input_ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Logits ``[B, N, V]`` of ``model`` on ``input_ids`` ``[B, N]``: one forward pass, or
    with ``chunk``, pieces of ``chunk`` tokens run in order against the model's own KV
    cache (each piece after the first continues the cache: chunked prefill).

    Raises:
        TypeError: the model's output is neither a tensor nor has ``.logits``; with
            ``chunk``, the model takes no cache or returns none.
        ValueError: the logits do not have shape ``[B, N, V]``; ``chunk`` is not positive
            (TypeError: not an int).
    """
    input_ids = _check_input_ids(input_ids)
    n = input_ids.shape[1]
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int):
            raise TypeError(f"chunk must be an int (tokens per forward) or None, got {chunk!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
        if chunk >= n:
            chunk = None
    with torch.no_grad():
        if chunk is None:
            logits = _logits(model, model(input_ids, **_forward_kwargs(model)))
        else:
            logits = _chunked_logits(model, input_ids, chunk)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"expected logits [B, N, V] for input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    return logits


def _logits(model: nn.Module, out) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(out).__name__}; expected a logits tensor "
            "or an output with .logits (a causal language model)"
        )
    return logits


def _chunked_logits(model: nn.Module, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    name = cache_kwarg(model)
    if not forward_takes(model, name) or not forward_takes(model, "use_cache"):
        raise TypeError(
            f"scoring in chunks needs a model that takes and returns a KV cache (a Hugging "
            f"Face causal LM); {type(model).__name__}.forward has no use_cache/cache "
            "parameters: score it in one pass (chunk=None)"
        )
    cache, parts = None, []
    for start in range(0, input_ids.shape[1], chunk):
        kwargs = {"use_cache": True} if cache is None else {"use_cache": True, name: cache}
        out = model(input_ids[:, start:start + chunk], **kwargs)
        parts.append(_logits(model, out))
        # (not `or`: a cache holding no layer yet is falsy)
        cache = getattr(out, "cache", None)
        cache = getattr(out, "past_key_values", None) if cache is None else cache
        if cache is None:
            raise TypeError(
                f"{type(model).__name__} returned no cache with use_cache=True, so a chunk "
                "cannot continue the one before it: score it in one pass (chunk=None)"
            )
    return torch.cat(parts, dim=1)


def _check_ranges(ranges: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    checked = []
    for r in ranges:
        if (
            not isinstance(r, (tuple, list))
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise TypeError(f"each range must be a (start, end) pair of ints, got {r!r}")
        start, end = r
        if not (0 <= start < end <= n):
            raise ValueError(
                f"range {tuple(r)} must satisfy 0 <= start < end <= {n} (the sequence length)"
            )
        if end <= max(start, 1):
            raise ValueError(
                f"range {tuple(r)} predicts no token: position 0 has no prediction, "
                "so a range must end after position 1"
            )
        checked.append((start, end))
    return checked


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Negative log-likelihood of each next token, in float64.

    Args:
        logits: ``[B, N, V]``; row ``t`` predicts token ``t + 1``.
        input_ids: ``[B, N]``.
        chunk: positions per log-softmax, to bound the scratch memory.

    Returns:
        ``[B, N - 1]``: entry ``t - 1`` is the NLL of token ``t``.
    """
    b, n, v = logits.shape
    targets = input_ids[:, 1:].reshape(-1).long()
    flat = logits[:, :-1].reshape(-1, v)
    parts = [
        torch.nn.functional.cross_entropy(
            flat[i : i + chunk].float(), targets[i : i + chunk], reduction="none"
        )
        for i in range(0, flat.shape[0], chunk)
    ]
    return torch.cat(parts).double().reshape(b, n - 1)


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    ranges: Sequence[tuple[int, int]] | None = None,
    chunk: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``input_ids`` from one forward pass (no gradients), or
    from pieces of ``chunk`` tokens that continue the model's KV cache.

    Token ``t`` is predicted from the logits at position ``t - 1``, so a
    sequence of ``N`` tokens gives ``N - 1`` predictions (no BOS is added).

    Args:
        model: a causal LM; its output is a logits tensor or has ``.logits``.
        input_ids: ``[N]`` or ``[B, N]`` token ids, ``N >= 2``.
        ranges: ``(start, end)`` pairs of token positions, ``0 <= start < end <= N``;
            each covers the predictions of tokens ``max(start, 1) .. end - 1``.
            E.g. ``[(0, 2048), (2048, 4096)]`` for the two halves of 4096 tokens.
        chunk: tokens per forward (None: all at once); each piece after the first runs
            against the cache of the ones before, as chunked prefill or a second turn
            of a conversation does (`logits_of`).

    Returns:
        A :class:`PerplexityResult`; when the ranges partition ``0 .. N`` their
        token-weighted mean NLL equals the overall NLL.

    Raises:
        TypeError, ValueError: bad ``input_ids`` or ``ranges`` (the message says which).
    """
    input_ids = _check_input_ids(input_ids)
    n = input_ids.shape[1]
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    checked = _check_ranges(ranges or [], n)
    nll = token_nll(logits_of(model, input_ids, chunk), input_ids)  # [B, N - 1]
    mean = nll.mean().item()
    return PerplexityResult(
        ppl=_exp(mean),
        nll=mean,
        n_tokens=nll.numel(),
        ranges=[_range_ppl(nll, s, e) for s, e in checked],
    )


def _range_ppl(nll: torch.Tensor, start: int, end: int) -> RangePerplexity:
    part = nll[:, max(start, 1) - 1 : end - 1]
    mean = part.mean().item()
    return RangePerplexity(start, end, part.numel(), mean, _exp(mean))


def _exp(x: float) -> float:
    """``exp`` that gives inf instead of raising on overflow (a broken model's ppl); nan stays nan."""
    return math.inf if x > 709.0 else math.exp(x)


def time_forward(
    model: nn.Module, input_ids: torch.Tensor, repeat: int = 3, warmup: int = 1
) -> Timing:
    """Time ``repeat`` forward passes (no gradients, no KV cache) after ``warmup`` ones.

    On CUDA the device is synchronised around each pass. Never assert on these
    numbers in a unit test.

    Raises:
        ValueError: ``repeat < 1`` or ``warmup < 0``.
    """
    return time_forwards({"model": model}, input_ids, repeat=repeat, warmup=warmup)["model"]


def time_forwards(
    models: Mapping[str, nn.Module], input_ids: torch.Tensor, repeat: int = 3, warmup: int = 1
) -> dict[str, Timing]:
    """Time several models on the same input, alternating between them.

    Each round runs every model once, so a change in machine load during the
    measurement (other processes, frequency scaling) affects all of them alike
    and their ratio stays meaningful. ``warmup`` rounds come first, untimed.

    Returns:
        ``{name: Timing}`` in the order of ``models``.

    Raises:
        ValueError: ``repeat < 1``, ``warmup < 0`` or no models.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not models:
        raise ValueError("time_forwards needs at least one model")
    input_ids = _check_input_ids(input_ids)
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    for _ in range(warmup):
        for model in models.values():
            logits_of(model, input_ids)
    sync()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeat):
        for name, model in models.items():
            t0 = time.perf_counter()
            logits_of(model, input_ids)
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(t) for name, t in times.items()}
