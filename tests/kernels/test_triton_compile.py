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

import inspect
import json
import math
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
# the mass estimate (triton_mass.py): (means per tile E, head dim, query slots BS, arch)
MASS_VARIANTS = [(4, 64, 32, 90), (8, 128, 64, 90), (2, 64, 16, 80), (64, 64, 32, 80)]
# the pyramid bank (triton_pyramid.py): (tile, head dim, value dim, arch)
PYRAMID_VARIANTS = [(64, 64, 64, 90), (32, 128, 128, 90), (16, 64, 64, 80)]
# the state's per-tile sums (triton_state.py): (tile, head dim, value dim, features, sums, arch)
STATE_VARIANTS = [(64, 64, 64, 64, False, 90), (64, 64, 64, 64, True, 90),
                  (32, 128, 128, 48, True, 80), (8, 64, 64, 64, True, 90)]

# compiles each job {module, kernel, sig, consts, arch, options} and prints the cubin sizes
_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = {"bf16": tl.bfloat16, "fp16": tl.float16}
    results = []
    for job in json.loads(sys.argv[1]):
        kern = getattr(importlib.import_module(job["module"]), job["kernel"])()
        consts = {k: dtypes.get(v, v) if k == "DOT_DTYPE" else v
                  for k, v in job["consts"].items()}
        assert set(job["sig"]) | set(consts) == set(kern.arg_names)
        sig = {n: job["sig"].get(n, "constexpr") for n in kern.arg_names}
        k = triton.compile(ASTSource(kern, sig, consts),
                           target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        results.append(len(k.asm["cubin"]))
    print(json.dumps(results))
    """
)


def _jobs(module, kernel_fn, todo, pointer_types, first_scalar, floats=()):
    """Compile jobs for one kernel, one per ``(consts, arch, options)`` of ``todo``: the
    arguments before ``first_scalar`` are pointers (fp32 unless ``pointer_types`` says),
    the other runtime ones int32 (fp32 if in ``floats``), the rest the constexprs."""
    names = list(inspect.signature(kernel_fn).parameters)
    jobs = []
    for consts, arch, options in todo:
        runtime = names[:len(names) - len(consts)]
        assert set(consts) == set(names[len(runtime):]), set(consts) ^ set(names[len(runtime):])
        cut = runtime.index(first_scalar)
        sig = {n: "*" + pointer_types.get(n, "fp32") for n in runtime[:cut]}
        sig.update({n: "fp32" if n in floats else "i32" for n in runtime[cut:]})
        jobs.append({"module": module.__name__, "kernel": "_kernel", "sig": sig,
                     "consts": consts, "arch": arch, "options": options})
    return jobs


def _compile_all(jobs: list) -> None:
    """Run the jobs without the interpreter; every one must give a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(jobs)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == len(jobs) and all(s > 1000 for s in sizes), sizes


def test_every_plan_variant_compiles_to_a_cubin():
    from nanite_compile.kernels import triton_attn as ta

    jobs = []
    for qdt, T, D, BE, diag, entries, state, arch in VARIANTS:
        half = qdt != "fp32"
        bm = ta.next_pow2(T)
        consts = dict(
            T=T, D=D, DV=D, F=D, BM=bm, BD=ta.next_pow2(D), BDV=ta.next_pow2(D),
            BF=ta.next_pow2(D), BE=BE, USE_DIAG=diag, USE_ENTRIES=entries, USE_STATE=state,
            HALF_DOT=half, EMULATE_HALF=False, DOT_DTYPE="bf16" if qdt == "bf16" else "fp16",
            PRECISION="tf32" if half else "tf32x3",
        )
        jobs += _jobs(ta, ta.tiled_attn_fwd_kernel, [(consts, arch, ta._launch_options(bm))],
                      {"Q": qdt, "OUT": qdt, "IDX": "i32", "CNT": "i32"}, "scale",
                      ("scale", "sqrt_scale", "half_log_f"))
    _compile_all(jobs)


def test_the_mass_kernel_compiles_to_a_cubin():
    from nanite_compile.kernels import triton_mass as tm

    todo = [(dict(E=E, D=D, BD=tm.next_pow2(D), BS=BS, BC=max(64, tm.next_pow2(E)),
                  PRECISION="tf32x3"), arch, {"num_warps": 4})
            for E, D, BS, arch in MASS_VARIANTS]
    _compile_all(_jobs(tm, tm._mass_kernel, todo,
                       {"rq_ptr": "i32", "rl_ptr": "i32", "cnt_ptr": "i32"}, "scale", ("scale",)))


def test_the_pyramid_kernel_compiles_to_a_cubin():
    from nanite_compile.kernels import triton_pyramid as tp

    todo = [(dict(T=T, LEVELS=int(math.log2(T)), D=D, DV=DV, BD=tp.next_pow2(D),
                  BDV=tp.next_pow2(DV)), arch, {"num_warps": 4})
            for T, D, DV, arch in PYRAMID_VARIANTS]
    _compile_all(_jobs(tp, tp._pyramid_kernel, todo, {"W": "i8"}, "hkv"))


def test_the_state_kernel_compiles_to_a_cubin():
    from nanite_compile.kernels import triton_state as ts

    todo = [(dict(T=T, D=D, DV=DV, F=F, BT=ts.next_pow2(T), BD=ts.next_pow2(D),
                  BDV=ts.next_pow2(DV), BF=ts.next_pow2(F), SUMS=sums, PRECISION="tf32x3"),
             arch, {"num_warps": 4}) for T, D, DV, F, sums, arch in STATE_VARIANTS]
    _compile_all(_jobs(ts, ts._state_tile_kernel, todo, {"VALID": "i8"}, "sqrt_scale",
                       ("sqrt_scale", "half_scale", "half_log_f")))
