"""The Triton path of tiled attention (CUDA; CPU under the Triton interpreter).

Same math and contract as ``cpu.tiled_attention_cpu`` (``kernels/README.md``,
section "Triton kernel"): the pyramid bank (``triton_pyramid.py``) and the
state's per-tile sums (``triton_state.py``) are Triton kernels, the entry list
of each query tile and the state's prefix sums over tiles are built in
PyTorch, then one fused
forward kernel per plan does, for every (batch, query head, query tile), an
online softmax (fp32) over

* the causal diagonal tile (contiguous level-0 keys, causal mask inside),
* the bank entries the level table selects (gathered by an int32 index list,
  ``log n`` bias, padding ``-inf``),
* the STATE read-out ``phi(q)^T S_j / phi(q)^T z_j`` on the same log scale,

with GQA by index (KV head ``h // G``). Tile, head widths, feature width, the
entry block and which tiers exist are ``tl.constexpr``, so each plan compiles
its own kernel.

Importing this module does not need Triton (``supports`` is then False);
``import nanite_compile`` never imports this module.
"""

from __future__ import annotations

import math
import os

import torch

from ._triton import next_pow2, tl, triton
from .cpu import _state_rows
from .levels import EXACT, NONE, STATE
from .reference import _entry_index, _stage, pad_to
from .triton_mass import tile_importance_triton as importance  # the level rule's estimate
from .triton_pyramid import pyramid_triton
from .triton_state import state_tiles_triton

if triton is not None:  # optional dependency: the op falls back to PyTorch without it
    from triton.runtime.errors import OutOfResources as _OUT_OF_RESOURCES
else:  # pragma: no cover - exercised only where triton is missing
    _OUT_OF_RESOURCES = ()

__all__ = ["available", "importance", "run", "supports", "tiled_attention_triton"]

# entries scored per step of the entry loop: the default, and the candidates the
# CUDA autotune times once per plan (never on the CPU / interpreter)
BLOCK_E = 64
BLOCK_E_CHOICES = (32, 64, 128)
_BEST_BLOCK_E: dict[tuple, int] = {}


def available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(q: torch.Tensor, v: torch.Tensor, window: int | None) -> bool:
    """Whether this path applies: Triton, CUDA tensors (CPU under ``TRITON_INTERPRET=1``),
    fp32/fp16/bf16, no sliding window, head widths up to 256."""
    if triton is None or window is not None:
        return False
    if q.device.type == "cuda":
        pass
    elif q.device.type == "cpu":
        if not _interpreting():
            return False
    else:
        return False
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and v.shape[-1] <= 256)


def _dot_operand(x, HALF_DOT: tl.constexpr, EMULATE_HALF: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``x`` as a dot operand: half precision when asked (rounded, then back to fp32 under
    the interpreter, whose half dot is wrong), else as is."""
    if HALF_DOT:
        x = x.to(DOT_DTYPE)
        if EMULATE_HALF:
            x = x.to(tl.float32)
    return x


def _absorb(s, vv, m_i, l_i, acc, HALF_DOT: tl.constexpr, EMULATE_HALF: tl.constexpr,
            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step: fold the scores ``s`` [BM, BE] and values ``vv`` into
    the running max ``m_i``, normaliser ``l_i`` and accumulator ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = _dot_operand(p, HALF_DOT, EMULATE_HALF, DOT_DTYPE)
    vv = _dot_operand(vv, HALF_DOT, EMULATE_HALF, DOT_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision=PRECISION)
    return m_new, l_i, acc


def tiled_attn_fwd_kernel(
    Q, BANK_K, BANK_V, BANK_LC, IDX, CNT, W, S_ROW, Z_ROW, CK, OUT,
    scale, sqrt_scale, half_log_f,
    H, G, HKV, NQ, Q0, JQ0, MQ, NB, P,
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    T: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BE: tl.constexpr,
    USE_DIAG: tl.constexpr, USE_ENTRIES: tl.constexpr, USE_STATE: tl.constexpr,
    HALF_DOT: tl.constexpr, EMULATE_HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (query tile, batch x query head); see the module docstring."""
    j = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // H
    h = pid % H
    hk = h // G
    bh = (b * HKV + hk).to(tl.int64)

    r = tl.arange(0, BM)
    t_abs = (JQ0 + j) * T + r  # absolute query position
    qi = t_abs - Q0  # index into the Nq queries
    row_ok = (r < T) & (qi >= 0) & (qi < NQ)
    dd = tl.arange(0, BD)
    dvv = tl.arange(0, BDV)
    d_ok = dd < D
    dv_ok = dvv < DV
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
        + qi[:, None].to(tl.int64) * stride_qn + dd[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BM, BD]
    q_dot = _dot_operand(q, HALF_DOT, EMULATE_HALF, DOT_DTYPE)  # fp32 accumulation always

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    kbase = BANK_K + bh * NB * D
    vbase = BANK_V + bh * NB * DV
    lcbase = BANK_LC + b.to(tl.int64) * NB

    # Each block names its own tiles (kd/ke, vd/ve, ...): compiled Triton treats a name
    # assigned before a loop and again inside it as loop-carried, and the diagonal
    # tile [BM, .] and an entry block [BE, .] differ in shape.
    if USE_DIAG:
        # own tile, level-0 bank rows (zeroed where padded, bias -inf there)
        c = tl.arange(0, BM)
        kpos = (JQ0 + j) * T + c
        c_ok = c < T
        kd = tl.load(kbase + kpos[:, None] * D + dd[None, :],
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        vd = tl.load(vbase + kpos[:, None] * DV + dvv[None, :],
                     mask=c_ok[:, None] & dv_ok[None, :], other=0.0)  # [BM, BDV]
        lcd = tl.load(lcbase + kpos, mask=c_ok, other=float("-inf"))  # [BM]
        kd = _dot_operand(kd, HALF_DOT, EMULATE_HALF, DOT_DTYPE)
        sd = tl.dot(q_dot, tl.trans(kd), input_precision=PRECISION) * scale + lcd[None, :]
        sd = tl.where(c[None, :] <= r[:, None], sd, float("-inf"))
        m_i, l_i, acc = _absorb(sd, vd, m_i, l_i, acc, HALF_DOT, EMULATE_HALF, DOT_DTYPE,
                                PRECISION)

    if USE_ENTRIES:
        erow = bh * MQ + j
        n_e = tl.load(CNT + erow)
        ibase = IDX + erow * P
        for e0 in range(0, n_e, BE):
            e = e0 + tl.arange(0, BE)
            e_ok = e < n_e
            ix = tl.load(ibase + e, mask=e_ok, other=0).to(tl.int64)  # [BE]
            lce = tl.load(lcbase + ix, mask=e_ok, other=float("-inf"))  # [BE]
            ke = tl.load(kbase + ix[:, None] * D + dd[None, :],
                         mask=e_ok[:, None] & d_ok[None, :], other=0.0)  # [BE, BD]
            ve = tl.load(vbase + ix[:, None] * DV + dvv[None, :],
                         mask=e_ok[:, None] & dv_ok[None, :], other=0.0)  # [BE, BDV]
            ke = _dot_operand(ke, HALF_DOT, EMULATE_HALF, DOT_DTYPE)
            se = tl.dot(q_dot, tl.trans(ke), input_precision=PRECISION) * scale + lce[None, :]
            m_i, l_i, acc = _absorb(se, ve, m_i, l_i, acc, HALF_DOT, EMULATE_HALF, DOT_DTYPE,
                                    PRECISION)

    if USE_STATE:
        # log phi(q)_f = sqrt(s) q.W_f - s|q|^2/2 - log(F)/2 + c (keys' stabiliser)
        ff = tl.arange(0, BF)
        f_ok = ff < F
        w = tl.load(W + hk.to(tl.int64) * D * F + dd[:, None] * F + ff[None, :],
                    mask=d_ok[:, None] & f_ok[None, :], other=0.0)  # [BD, BF]
        u = tl.dot(q * sqrt_scale, w, input_precision="ieee")  # [BM, BF]
        ck = tl.load(CK + bh)
        lq = u - 0.5 * scale * tl.sum(q * q, 1)[:, None] - half_log_f + ck
        lq = tl.where(f_ok[None, :], lq, float("-inf"))
        srow = bh * MQ + j
        z = tl.load(Z_ROW + srow * F + ff, mask=f_ok, other=0.0)  # [BF]
        sr = tl.load(S_ROW + srow * F * DV + ff[:, None] * DV + dvv[None, :],
                     mask=f_ok[:, None] & dv_ok[None, :], other=0.0)  # [BF, BDV]
        has = tl.max(z, 0) > 0.0
        m_s = tl.where(has, tl.max(lq, 1), float("-inf"))
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        ws = tl.where(has, tl.exp(lq - m_safe[:, None]), 0.0)  # [BM, BF], every exponent <= 0
        l_i = l_i * alpha + tl.sum(ws * z[None, :], 1)
        acc = acc * alpha[:, None] + tl.dot(ws, sr, input_precision="ieee")
        m_i = m_new

    out = tl.where(l_i[:, None] > 0.0, acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + qi[:, None].to(tl.int64) * stride_on + dvv[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


_KERNEL = None


def _kernel():
    """The forward kernel, jitted once per process.

    ``TRITON_INTERPRET=1`` must be set before Triton is imported for the
    interpreter (its ``tl`` library functions are jitted at import), so the
    mode is whatever the process started with.
    """
    global _KERNEL, _dot_operand, _absorb
    if _KERNEL is None:
        # the kernel's helpers are module globals: jitted first, so it calls the jitted ones
        _dot_operand = triton.jit(_dot_operand)
        _absorb = triton.jit(_absorb)
        _KERNEL = triton.jit(tiled_attn_fwd_kernel)
    return _KERNEL


def _launch_options(bm: int) -> dict:
    """Compiler options of a launch with ``bm`` query rows per program (not for the
    interpreter). Two stages: gathered K/V blocks of 3 would not fit shared memory
    at D = 128."""
    return {"num_warps": 4 if bm <= 64 else 8, "num_stages": 2}


def _cuda_time(fn, repeat: int = 3) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (after one warm-up/compile)."""
    fn()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _pick_block_e(key: tuple, launch, timer) -> int:
    """The entry block of a plan: each of ``BLOCK_E_CHOICES`` timed once, the fastest kept.

    ``launch(block_e)`` runs the kernel; ``timer(fn)`` returns its time. The choice is
    cached per ``key`` (the plan's constexprs and the entry count's power of two).
    """
    if key not in _BEST_BLOCK_E:
        times = {}
        for be in BLOCK_E_CHOICES:
            try:
                times[be] = timer(lambda be=be: launch(be))
            except _OUT_OF_RESOURCES:  # e.g. too much shared memory: not a candidate here
                continue
        if not times:
            raise RuntimeError(f"no entry block of {BLOCK_E_CHOICES} fits this plan")
        _BEST_BLOCK_E[key] = min(times, key=times.get)
    return _BEST_BLOCK_E[key]


def _state_inputs(kc, vc, valid, lv, feature_proj, scale, T):
    """The STATE read-out's inputs: the feature map ``[Hkv, D, F]``, per-row sums
    ``S_j [B, Hkv, mq, F, Dv]`` and ``z_j [B, Hkv, mq, F]`` of the tiles each row
    folds, and the keys' stabiliser ``[B, Hkv]``. The per-tile sums are Triton
    kernels (`triton_state.py`: the keys' features never reach memory); the prefix
    sums over tiles and the rows' differences are PyTorch (`cpu._state_rows`)."""
    proj = feature_proj.to(device=kc.device, dtype=kc.dtype).contiguous()  # [Hkv, D, F]
    s_tile, z_tile, ck = state_tiles_triton(kc, vc, valid, proj, scale, T)
    s_row, z_row = _state_rows(lv, s_tile, z_tile)
    return proj, s_row.contiguous(), z_row.contiguous(), ck


def tiled_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    tile: int,
    key_valid: torch.Tensor | None = None,
    feature_proj: torch.Tensor | None = None,
    chunk_bytes: int = 256 * 2**20,
    block_e: int | None = None,
) -> torch.Tensor:
    """Tiled attention for a given level table; the contract of ``cpu.tiled_attention_cpu``.

    Args:
        q: ``[B, H, Nq, D]``, the last ``Nq`` of the ``Nk`` positions.
        k: ``[B, Hkv, Nk, D]``; v: ``[B, Hkv, Nk, Dv]``.
        levels: ``[B, Hkv, mq, mk]`` level table; under causality the diagonal
            tile must be EXACT (or all padding) and nothing above it seen.
        scale, causal, tile, key_valid, feature_proj: as the reference's.
        chunk_bytes: unused (the kernel needs no per-chunk scratch); kept for
            the common signature.
        block_e: entries per step of the entry loop. Default: on CUDA the
            fastest of ``BLOCK_E_CHOICES`` for this plan (timed on the first call,
            then cached); under the interpreter ``BLOCK_E``.

    Returns:
        ``[B, H, Nq, Dv]`` in q's dtype.
    """
    del chunk_bytes
    if triton is None:
        raise RuntimeError("triton is not installed")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton path takes fp32/fp16/bf16, got {q.dtype}")
    cd = torch.float32
    dev = q.device
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    G = h // hkv
    T = tile
    mk = -(-nk // T)
    npad = mk * T
    jq0 = (nk - nq) // T
    mq = mk - jq0
    if tuple(levels.shape) != (b, hkv, mq, mk):
        raise ValueError(f"levels must be {(b, hkv, mq, mk)}, got {tuple(levels.shape)}")

    valid = torch.ones(b, nk, dtype=torch.bool, device=dev) if key_valid is None else key_valid
    valid = pad_to(valid, npad, dim=-1, value=False)
    kc, vc = pad_to(k.to(cd), npad), pad_to(v.to(cd), npad)

    lv = levels.to(torch.int64)
    rest = lv
    if causal:
        qt = (jq0 + torch.arange(mq, device=dev))[:, None]
        kt = torch.arange(mk, device=dev)[None, :]
        diag = qt == kt
        dl = lv.masked_select(diag.expand_as(lv))
        if not bool(((dl == EXACT) | ((dl == NONE) & (key_valid is not None))).all()):
            raise ValueError("the causal diagonal tile must be EXACT (or all padding)")
        if bool((lv.masked_select((kt > qt).expand_as(lv)) != NONE).any()):
            raise ValueError("a causal level table sees nothing above the diagonal")
        rest = lv.masked_fill(diag, NONE)

    with _stage("nanite.pyramid"):
        bank_k, bank_v, bank_lc, offs = pyramid_triton(kc, vc, valid, T)  # one launch
    nb = bank_k.shape[2]
    use_entries = bool((rest >= 0).any())
    if use_entries:
        with _stage("nanite.entries"):
            idx, ok = _entry_index(rest, offs, T)  # [B, Hkv, mq, P]
            cnt = ok.sum(-1).to(torch.int32).contiguous()
            idx = idx.to(torch.int32).contiguous()
    else:
        idx = torch.zeros(1, dtype=torch.int32, device=dev)
        cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    P = idx.shape[-1] if use_entries else 1

    use_state = bool((lv == STATE).any())
    if use_state:
        if feature_proj is None:
            raise ValueError("the level table has STATE tiles: feature_proj is needed")
        with _stage("nanite.state_sums"):
            proj, s_row, z_row, ck = _state_inputs(kc, vc, valid, lv, feature_proj, scale, T)
        nf = proj.shape[-1]
    else:
        nf = 1
        proj = s_row = z_row = ck = torch.zeros(1, dtype=cd, device=dev)

    q_ = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=dev)
    interpret = _interpreting()
    half = q.dtype in (torch.float16, torch.bfloat16)
    BM = next_pow2(T)
    consts = dict(
        T=T, D=d, DV=dv, F=nf, BM=BM, BD=next_pow2(d), BDV=next_pow2(dv), BF=next_pow2(nf),
        USE_DIAG=bool(causal), USE_ENTRIES=use_entries, USE_STATE=use_state,
        HALF_DOT=half, EMULATE_HALF=half and interpret,
        DOT_DTYPE=tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16,
        # fp32 operands: three tf32 products (about fp32 accuracy); half operands: native
        PRECISION="ieee" if interpret else ("tf32" if half else "tf32x3"),
    )
    kern = _kernel()
    grid = (mq, b * h)

    def launch(be: int) -> None:
        kern[grid](
            q_, bank_k.contiguous(), bank_v.contiguous(), bank_lc.contiguous(), idx, cnt, proj,
            s_row, z_row, ck, out,
            float(scale), math.sqrt(scale), 0.5 * math.log(nf),
            h, G, hkv, nq, nk - nq, jq0, mq, nb, P,
            q_.stride(0), q_.stride(1), q_.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            BE=be, **consts, **({} if interpret else _launch_options(BM)),
        )

    if block_e is None:
        if interpret or dev.type != "cuda" or not use_entries:
            block_e = BLOCK_E
        else:
            key = (*((k_, str(v_)) for k_, v_ in sorted(consts.items())), str(q.dtype),
                   next_pow2(P, 1),
                   torch.cuda.get_device_name(dev))
            block_e = _pick_block_e(key, launch, _cuda_time)
    with _stage("nanite.kernel"):
        launch(block_e)
    return out


# the name the driver (``reference.tiled_attention(fast=...)``) calls
run = tiled_attention_triton
