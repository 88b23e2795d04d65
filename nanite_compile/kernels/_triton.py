"""What the Triton kernels share: the optional import, block widths, jitting on first use."""

from __future__ import annotations

try:  # optional dependency: the Triton path is off without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

__all__ = ["Lazy", "next_pow2", "tl", "triton"]


def next_pow2(x: int, least: int = 16) -> int:
    """The block width for ``x`` elements: a power of two, at least ``least`` (tl.dot's
    smallest operand side is 16)."""
    return max(least, 1 << max(0, int(x - 1).bit_length()))


class Lazy:
    """A kernel jitted on its first use, once per process.

    ``TRITON_INTERPRET=1`` takes effect only if set before Triton is imported (the
    interpreter's own ``tl`` helpers are jitted then), so a kernel is jitted when first
    launched, under whatever mode the process started with, never at import.
    """

    def __init__(self, fn):
        self.fn = fn
        self.kernel = None

    def __call__(self):
        if self.kernel is None:
            self.kernel = triton.jit(self.fn)
        return self.kernel
