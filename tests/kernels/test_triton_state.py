"""The STATE path's per-tile sums in Triton (``kernels/triton_state.py``) against the
same sums in PyTorch from ``reference._log_features``.

Without CUDA the kernels run under the Triton interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1`` before Triton is imported); with CUDA they run compiled.
The PyTorch sums in fp64 are the golden result: the kernels' error stays within 4x
that of the same sums in fp32, plus a few ulps of the largest value.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from nanite_compile.kernels import triton_attn, triton_state
from nanite_compile.kernels.reference import _log_features, random_features

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


def torch_tiles(kc, vc, valid, proj, scale, T):
    """The sums as the PyTorch path forms them: every key's features in memory."""
    b, hkv, n, d = kc.shape
    mk = n // T
    kt = kc.reshape(b, hkv, mk, T, d)
    vt = vc.reshape(b, hkv, mk, T, vc.shape[-1])
    lk = _log_features(kt, proj, scale).masked_fill(~valid.reshape(b, 1, mk, T, 1), -math.inf)
    ck = lk.amax(dim=(2, 3, 4)).clamp_min(-1e30)
    phik = torch.exp(lk - ck[:, :, None, None, None])
    return torch.einsum("bhitf,bhitd->bhifd", phik, vt), phik.sum(3), ck


@pytest.mark.parametrize("b, hkv, n, d, dv, f, tile, pad", [
    (1, 2, 128, 16, 16, 32, 16, None),
    (2, 3, 96, 24, 40, 20, 8, "left"),  # widths that are not powers of two, padding
    (2, 1, 64, 16, 16, 16, 32, "all"),  # one batch row with no valid key at all
])
def test_state_tiles_match_the_pytorch_sums(b, hkv, n, d, dv, f, tile, pad):
    g = torch.Generator().manual_seed(n + f)
    k = torch.randn(b, hkv, n, d, generator=g) * 0.7
    v = torch.randn(b, hkv, n, dv, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad == "left":
        valid[-1, : n // 3 + 1] = False
    elif pad == "all":
        valid[-1] = False
    proj = random_features(d, f, hkv, seed=1, device="cpu", dtype=torch.float32)
    s = d**-0.5
    out = triton_state.state_tiles_triton(k.to(DEV), v.to(DEV), valid.to(DEV), proj.to(DEV),
                                          s, tile)
    gold = torch_tiles(k.double(), v.double(), valid, proj.double(), s, tile)
    ref = torch_tiles(k, v, valid, proj, s, tile)
    for o, gd, r in zip(out, gold, ref, strict=True):
        o = o.cpu()
        assert o.shape == gd.shape and o.dtype == torch.float32
        err = (o.double() - gd).abs().max().item()
        base = (r.double() - gd).abs().max().item()
        eps = torch.finfo(torch.float32).eps
        assert err <= 4 * base + 4 * eps * max(1.0, gd.abs().max().item()), (err, base)
    if pad == "all":  # nothing to fold: zero sums, the stabiliser's floor
        assert bool((out[0][-1] == 0).all()) and bool((out[1][-1] == 0).all())
        assert bool((out[2][-1].cpu() == -1e30).all())
