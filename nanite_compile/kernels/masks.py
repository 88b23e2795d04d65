"""Read a dense attention mask as the structure the tiled operator understands.

Models hand attention a dense mask ``[B|1, H|1, Nq, Nk]`` (bool, or additive
with 0 for "attend" and a large negative number for "blocked"). The tiled
operator never takes an N x N mask: it needs *causal or not*, an optional
sliding window, and which keys are padding. `read_mask` recovers those and
checks the mask against them row by row; rows it cannot express (and every
mask that is really a bias, such as ALiBi) are reported so the caller computes
them exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# An additive mask entry at or below this is "blocked" (HF uses finfo.min,
# others -inf or -1e4..-1e9); anything else but 0 makes the mask a bias.
BLOCKED_BELOW = -1.0e4


@dataclass
class MaskStructure:
    """What a dense mask says, in the operator's terms.

    Attributes:
        causal: keys after the query's position are blocked.
        window: sliding window in tokens (a query sees keys ``pos-window+1 .. pos``), or None.
        key_valid: ``[B, Nk]`` bool, False for padding keys; None when all keys are valid.
        bad_rows: ``[B, Nq]`` bool, rows whose mask the structure does not
            reproduce (computed exactly by the caller); None when there are none.
    """

    causal: bool
    window: int | None
    key_valid: torch.Tensor | None
    bad_rows: torch.Tensor | None


    def describe(self) -> str:
        """A short name: ``causal``, ``causal+padding``, ``sliding-window(64)+padding``, ..."""
        name = "causal" if self.causal else "bidirectional"
        if self.window is not None:
            name = f"sliding-window({self.window})"
        if self.key_valid is not None:
            name += "+padding"
        if self.bad_rows is not None:
            name += "+irregular-rows"
        return name

    @staticmethod
    def window_of(name: str) -> int | None:
        """The sliding window a `describe` name holds (a report's ``runtime_mask``), or None."""
        found = re.match(r"sliding-window\((\d+)\)", name or "")
        return int(found.group(1)) if found else None


def allowed_from_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """Return the bool "may attend" tensor of a mask, or None if it is a bias."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    allowed = mask == 0
    blocked = mask <= BLOCKED_BELOW
    if not bool((allowed | blocked).all()):
        return None
    return allowed


def structured_allowed(
    nq: int, nk: int, causal: bool, window: int | None, key_valid: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The dense ``[B|1, Nq, Nk]`` bool mask a structure stands for (tests and checks)."""
    qpos = torch.arange(nk - nq, nk, device=device)[:, None]
    kpos = torch.arange(nk, device=device)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed &= kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    allowed = allowed[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed


def read_mask(mask: torch.Tensor, nq: int, nk: int, batch: int) -> MaskStructure | None:
    """Recover causal / window / padding structure from a dense mask.

    Args:
        mask: bool or additive mask broadcastable to ``[B, H, Nq, Nk]``.
        nq, nk: query and key lengths (queries are the last ``nq`` positions).
        batch: batch size ``B``.

    Returns:
        The structure, or None when the mask is a bias or differs between
        heads (the caller then computes attention exactly with the mask).
    """
    allowed = allowed_from_mask(mask)
    if allowed is None:
        return None
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            return None
    allowed = allowed[:, 0].expand(allowed.shape[0], nq, nk)
    key_valid = allowed.any(dim=1)  # [B', Nk]: a key no query may see is padding
    if key_valid.shape[0] != batch:
        key_valid = key_valid.expand(batch, nk)
        allowed = allowed.expand(batch, nq, nk)

    qpos = torch.arange(nk - nq, nk, device=mask.device)
    kpos = torch.arange(nk, device=mask.device)
    future = kpos[None, :] > qpos[:, None]  # [Nq, Nk]
    causal = not bool((allowed & future).any())
    window = None
    if causal:
        # the widest reach back of any row: first allowed key of each row
        first = torch.where(allowed, kpos, nk).amin(dim=-1)  # [B, Nq]
        has = first < nk
        if bool(has.any()):
            reach = (qpos[None, :] - first + 1)[has].max()
            full = structured_allowed(nq, nk, True, None, key_valid, mask.device)
            if not bool((allowed == full).all()) and int(reach) < nk:
                window = int(reach)
    expect = structured_allowed(nq, nk, causal, window, key_valid, mask.device)
    bad = (allowed != expect).any(dim=-1)  # [B, Nq]
    if mask.is_floating_point() and bool((torch.isfinite(mask) & (mask <= BLOCKED_BELOW)).any()):
        # a row whose every key is blocked by a finite value is no empty row to SDPA: the
        # logits vanish next to the mask and it averages all values; exact rows do that
        bad = bad | ~allowed.any(dim=-1)
    all_valid = bool(key_valid.all())
    return MaskStructure(
        causal=causal,
        window=window,
        key_valid=None if all_valid else key_valid,
        bad_rows=bad if bool(bad.any()) else None,
    )
