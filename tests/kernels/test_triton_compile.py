"""The Triton kernels compile for real GPUs, checked on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, what test_triton.py runs on the CPU)
executes the kernel as Python and accepts programs the compiler rejects: a name
assigned a ``[BM, D]`` tile before the entry loop and a ``[BE, D]`` block inside
it ran fine there and failed to compile on the first GPU run. So every plan
variant is compiled here, ahead of time, to a cubin for sm_90 (H100/H200) and
sm_80 (A100) with Triton's own compiler and ptxas; no GPU is needed. It runs in
a subprocess because this folder's conftest turns the interpreter on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

pytestmark = pytest.mark.skipif(
    not _PTXAS.exists(), reason=f"Triton's bundled ptxas is missing ({_PTXAS})")

# (q dtype, tile, head dim, entry block, diag, entries, state, arch)
VARIANTS = [
    ("fp32", 64, 64, 32, True, True, True, 90),
    ("bf16", 64, 64, 128, True, True, True, 90),
    ("fp16", 32, 64, 64, True, True, False, 90),
    ("bf16", 128, 128, 64, True, True, True, 90),
    ("fp32", 64, 64, 64, False, True, True, 80),
    ("bf16", 64, 64, 32, True, False, False, 80),
]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nanite_compile.kernels import triton_attn as ta

    kern = ta._kernel()
    names = kern.arg_names
    first_const = names.index("T")
    pointers = names[:names.index("scale")]
    floats = ("scale", "sqrt_scale", "half_log_f")
    results = []
    for qdt, T, D, BE, diag, entries, state, arch in json.loads(sys.argv[1]):
        half = qdt != "fp32"
        bm = ta._next_pow2(T)
        consts = dict(
            T=T, D=D, DV=D, F=D, BM=bm, BD=ta._next_pow2(D), BDV=ta._next_pow2(D),
            BF=ta._next_pow2(D), BE=BE, USE_DIAG=diag, USE_ENTRIES=entries, USE_STATE=state,
            HALF_DOT=half, EMULATE_HALF=False,
            DOT_DTYPE=tl.bfloat16 if qdt == "bf16" else tl.float16,
            PRECISION="tf32" if half else "tf32x3",
        )
        assert set(consts) == set(names[first_const:]), set(consts) ^ set(names[first_const:])
        sig = {}
        for n in names[:first_const]:
            if n in pointers:
                sig[n] = "*" + ({"Q": qdt, "OUT": qdt, "IDX": "i32", "CNT": "i32"}.get(n, "fp32"))
            else:
                sig[n] = "fp32" if n in floats else "i32"
        sig.update({n: "constexpr" for n in consts})
        opts = ta._launch_options(bm)
        k = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", arch, 32),
                           options=opts)
        results.append(len(k.asm["cubin"]))
    print(json.dumps(results))
    """
)


def _compile_all(script: str, variants: list) -> None:
    """Run ``script`` (which compiles each variant and prints the cubin sizes) without
    the interpreter; every variant must give a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(variants)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == len(variants) and all(s > 1000 for s in sizes), sizes


def test_every_plan_variant_compiles_to_a_cubin():
    _compile_all(_SCRIPT, VARIANTS)


# the mass estimate (triton_mass.py): (means per tile E, head dim, query slots BS, arch)
MASS_VARIANTS = [(4, 64, 32, 90), (8, 128, 64, 90), (2, 64, 16, 80), (64, 64, 32, 80)]

_MASS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nanite_compile.kernels import triton_mass as tm

    kern = tm._kernel()
    names = kern.arg_names
    first_const = names.index("E")
    pointers = names[:names.index("scale")]
    ints = {"rq_ptr": "i32", "rl_ptr": "i32", "cnt_ptr": "i32"}
    results = []
    for E, D, BS, arch in json.loads(sys.argv[1]):
        consts = dict(E=E, D=D, BD=tm._next_pow2(D), BS=BS, BC=max(64, tm._next_pow2(E)),
                      PRECISION="tf32x3")
        assert set(consts) == set(names[first_const:]), set(consts) ^ set(names[first_const:])
        sig = {n: "*" + ints.get(n, "fp32") if n in pointers else
               ("fp32" if n == "scale" else "i32") for n in names[:first_const]}
        sig.update({n: "constexpr" for n in consts})
        k = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4})
        results.append(len(k.asm["cubin"]))
    print(json.dumps(results))
    """
)


def test_the_mass_kernel_compiles_to_a_cubin():
    _compile_all(_MASS_SCRIPT, MASS_VARIANTS)


# the pyramid bank (triton_pyramid.py): (tile, head dim, value dim, arch)
PYRAMID_VARIANTS = [(64, 64, 64, 90), (32, 128, 128, 90), (16, 64, 64, 80)]

_PYRAMID_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nanite_compile.kernels import triton_pyramid as tp

    kern = tp._kernel()
    names = kern.arg_names
    first_const = names.index("T")
    results = []
    for T, D, DV, arch in json.loads(sys.argv[1]):
        consts = dict(T=T, LEVELS=int(math.log2(T)), D=D, DV=DV, BD=tp._next_pow2(D),
                      BDV=tp._next_pow2(DV))
        assert set(consts) == set(names[first_const:]), set(consts) ^ set(names[first_const:])
        sig = {"K": "*fp32", "V": "*fp32", "W": "*i8", "BK": "*fp32", "BV": "*fp32",
               "BLC": "*fp32", "hkv": "i32", "n": "i32", "nb": "i32"}
        assert set(sig) == set(names[:first_const])
        sig.update({n: "constexpr" for n in consts})
        k = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4})
        results.append(len(k.asm["cubin"]))
    print(json.dumps(results))
    """
)


def test_the_pyramid_kernel_compiles_to_a_cubin():
    _compile_all(_PYRAMID_SCRIPT, PYRAMID_VARIANTS)


# the state's per-tile sums (triton_state.py): (tile, head dim, value dim, features, sums, arch)
STATE_VARIANTS = [(64, 64, 64, 64, False, 90), (64, 64, 64, 64, True, 90),
                  (32, 128, 128, 48, True, 80), (8, 64, 64, 64, True, 90)]

_STATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nanite_compile.kernels import triton_state as ts

    kern = ts._kernel()
    names = kern.arg_names
    first_const = names.index("T")
    pointers = names[:names.index("sqrt_scale")]
    floats = ("sqrt_scale", "half_scale", "half_log_f")
    results = []
    for T, D, DV, F, sums, arch in json.loads(sys.argv[1]):
        consts = dict(T=T, D=D, DV=DV, F=F, BT=ts._next_pow2(T), BD=ts._next_pow2(D),
                      BDV=ts._next_pow2(DV), BF=ts._next_pow2(F), SUMS=sums,
                      PRECISION="tf32x3")
        assert set(consts) == set(names[first_const:]), set(consts) ^ set(names[first_const:])
        sig = {n: ("*i8" if n == "VALID" else "*fp32") if n in pointers else
               ("fp32" if n in floats else "i32") for n in names[:first_const]}
        sig.update({n: "constexpr" for n in consts})
        k = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4})
        results.append(len(k.asm["cubin"]))
    print(json.dumps(results))
    """
)


def test_the_state_kernel_compiles_to_a_cubin():
    _compile_all(_STATE_SCRIPT, STATE_VARIANTS)
