"""The Triton pyramid bank (``kernels/triton_pyramid.py``) against ``reference._pyramid``.

Without CUDA the kernel runs under the Triton interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton is imported); with CUDA it runs compiled.
The PyTorch bank in fp64 is the golden result: the kernel's error stays within
4x that of the PyTorch bank in fp32, plus a few ulps.
"""

from __future__ import annotations

import os

import pytest
import torch

from nanite_compile.kernels import triton_attn, triton_pyramid
from nanite_compile.kernels.reference import _pyramid

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.skipif(not triton_attn.available(), reason="triton is not installed"),
    pytest.mark.skipif(
        not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
        reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set "
        "(run the kernel tests as their own pytest process, or set it in the environment)",
    ),
]


@pytest.mark.parametrize("b, hkv, n, d, dv, tile, pad", [
    (1, 2, 128, 16, 16, 16, None),
    (2, 3, 96, 24, 40, 8, "left"),  # head widths that are not powers of two, padding
    (2, 1, 64, 16, 16, 32, "holes"),  # padding inside tiles, a whole tile padded
    (1, 1, 16, 16, 8, 2, None),  # tile 2: one level above the keys
])
def test_pyramid_kernel_matches_the_pytorch_bank(b, hkv, n, d, dv, tile, pad):
    g = torch.Generator().manual_seed(n + d)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, dv, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad == "left":
        valid[-1, : n // 3 + 1] = False
    elif pad == "holes":
        valid[0, 3:7] = False
        valid[-1, tile:2 * tile] = False
    bk, bv, blc, offs = triton_pyramid.pyramid_triton(k.to(DEV), v.to(DEV), valid.to(DEV), tile)
    gk, gv, glc, _, goffs = _pyramid(k.double(), v.double(), valid, tile)
    rk, rv, rlc, _, _ = _pyramid(k, v, valid, tile)
    assert offs.cpu().tolist() == goffs.tolist()
    assert torch.equal(torch.isinf(blc.cpu()), torch.isinf(glc))
    for out, gold, ref in ((bk, gk, rk), (bv, gv, rv), (blc, glc, rlc)):
        out = out.cpu()
        assert out.shape == gold.shape and out.dtype == torch.float32
        fin = torch.isfinite(gold)
        err = (out.double() - gold)[fin].abs().max().item()
        base = (ref.double() - gold)[fin].abs().max().item()
        assert err <= 4 * base + 4 * torch.finfo(torch.float32).eps, (err, base)


def test_pyramid_kernel_rejects_a_bad_tile():
    k = torch.zeros(1, 1, 48, 16)
    with pytest.raises(ValueError, match="power of two dividing N"):
        triton_pyramid.pyramid_triton(k, k, torch.ones(1, 48, dtype=torch.bool), 32)
