"""The tiled attention operator against the math of DESIGN.md section 1.

Tolerances follow CONVENTIONS.md: every comparison runs an fp64 golden result
and asks the kernel's error to stay within a small factor of the error the
same-dtype reference (SDPA, or a hand-written formula) makes against it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanite_compile.kernels import cpu
from nanite_compile.kernels.levels import (
    EXACT,
    NONE,
    STATE,
    TileParams,
    _allowance,
    build_levels,
    default_solver,
    level_reads,
    tile_density,
    tile_importance,
)
from nanite_compile.kernels.reference import (
    exact_attention,
    random_features,
    tiled_attention,
    tiled_attention_from_levels,
)

# ---------------------------------------------------------------------------
# helpers


def assert_golden(out, golden, baseline, factor=4.0):
    """Kernel error vs fp64 golden within ``factor`` x the same-dtype reference's error."""
    assert out.dtype == baseline.dtype
    assert bool(torch.isfinite(out).all()), "non-finite output"
    err = (out.double() - golden).abs().max().item()
    base = (baseline.double() - golden).abs().max().item()
    floor = torch.finfo(out.dtype).eps * max(1.0, golden.abs().max().item())
    assert err <= factor * base + floor, f"error {err:.3e} vs reference error {base:.3e}"


def qkv(b, h, hkv, n, d, dv, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * scale
    k = torch.randn(b, hkv, n, d, generator=g) * scale
    v = torch.randn(b, hkv, n, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def key_padding(b, n, kind):
    """``[B, N]`` bool: batch 0 unpadded, batch 1 padded on the left or right."""
    valid = torch.ones(b, n, dtype=torch.bool)
    if kind == "left":
        valid[1, : n // 3 + 1] = False
    elif kind == "right":
        valid[1, n - n // 3 - 1 :] = False
    return valid


def dense_allowed(n, causal, key_valid):
    """``[B|1, 1, N, N]`` bool mask of causal + key padding."""
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return allowed


def visible_table(b, hkv, m, causal, fill=EXACT):
    """Every visible tile at ``fill``, NONE above the diagonal when causal."""
    lv = torch.full((b, hkv, m, m), fill, dtype=torch.int8)
    if causal:
        lv = lv.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), NONE)
    return lv


def sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def elu1(x):
    return F.elu(x) + 1.0


def prf(proj, scale):
    """The positive random feature map, written out: ``phi(x) = exp(w.x' - |x'|^2/2)/sqrt(F)``."""

    def phi(x, g):
        xs = x * math.sqrt(scale)
        w = proj[g].to(x.dtype)
        return torch.exp(xs @ w - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(w.shape[-1])

    return phi


def loop_reference(q, k, v, levels, *, scale, causal, tile, key_valid=None, phi=None):
    """DESIGN.md section 1 written tile by tile, without any stabiliser (moderate logits).

    EXACT: ``e^{s q.k} v`` over valid keys (causal inside the tile); POOL(r): for every
    group of ``2**r`` tokens ``n e^{s q.mean k} mean v`` (means over the ``n`` valid
    keys); STATE: ``phi(q).sum phi(k) v^T``; one normaliser for all of them.
    ``phi(x, kv_head)``.
    """
    b, h, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    rep = h // hkv
    m = -(-n // tile)
    valid = torch.ones(b, n, dtype=torch.bool) if key_valid is None else key_valid
    kp = F.pad(k, (0, 0, 0, m * tile - n))
    vp = F.pad(v, (0, 0, 0, m * tile - n))
    wp = F.pad(valid, (0, m * tile - n), value=False).to(q.dtype)
    out = torch.zeros(b, h, n, dv, dtype=q.dtype)
    for bi in range(b):
        for g in range(hkv):
            heads = slice(g * rep, (g + 1) * rep)
            for j in range(m):
                rows = torch.arange(j * tile, min(n, (j + 1) * tile))
                qj = q[bi, heads][:, rows]  # [G, t, D]
                num = torch.zeros(rep, len(rows), dv, dtype=q.dtype)
                den = torch.zeros(rep, len(rows), dtype=q.dtype)
                for i in range(m):
                    lvl = int(levels[bi, g, j, i])
                    cols = torch.arange(i * tile, (i + 1) * tile)
                    ki, vi, wi = kp[bi, g, cols], vp[bi, g, cols], wp[bi, cols]
                    if lvl == NONE:
                        continue
                    if lvl == EXACT:
                        w = torch.exp(scale * qj @ ki.T) * wi
                        if causal:
                            w = w * (cols[None, :] <= rows[:, None])
                    elif lvl == STATE:
                        pk = phi(ki, g) * wi[:, None]
                        pq = phi(qj, g)
                        num += pq @ (pk.T @ vi)
                        den += pq @ pk.sum(0)
                        continue
                    else:
                        wg = wi.reshape(-1, 2**lvl)  # [groups, 2**r]
                        cnt = wg.sum(-1)
                        kbar = (ki.reshape(-1, 2**lvl, d) * wg[..., None]).sum(1)
                        vbar = (vi.reshape(-1, 2**lvl, dv) * wg[..., None]).sum(1)
                        kbar = kbar / cnt.clamp_min(1)[:, None]
                        vi = vbar / cnt.clamp_min(1)[:, None]
                        w = cnt * torch.exp(scale * qj @ kbar.T)
                    num += w @ vi
                    den += w.sum(-1)
                o = torch.where(den[..., None] > 0, num / den[..., None], 0.0)
                out[bi, heads, j * tile : j * tile + len(rows)] = o
    return out


IMPLS = ["reference", "cpu"]


def run(impl, q, k, v, levels, **kw):
    """One level table through the reference arithmetic or the fast CPU path (``kernels/cpu.py``)."""
    if impl == "cpu":
        assert kw.pop("state_phi", None) is None and kw.pop("window", None) is None
        return cpu.tiled_attention_cpu(q, k, v, levels, **kw)
    return tiled_attention_from_levels(q, k, v, levels, **kw)


def random_table(b, hkv, m, causal, choices, seed):
    """A level table drawn from ``choices`` with an EXACT diagonal (NONE above it if causal)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(choices), (b, hkv, m, m), generator=g)
    lv = torch.tensor(choices, dtype=torch.int8)[pick]
    lv[..., torch.eye(m, dtype=torch.bool)] = EXACT
    if causal:
        lv = lv.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), NONE)
    return lv


# ---------------------------------------------------------------------------
# degenerate plans


EXACT_CASES = [
    (63, 16, True, None, 24),
    (63, 16, False, "right", 16),
    (200, 32, True, "right", 24),
    (200, 32, False, "left", 24),
    (500, 16, True, "left", 16),
    (500, 32, False, None, 24),
    (200, 16, True, None, 16),
]


@pytest.mark.parametrize(
    "n,tile,causal,pad,dv,impl",
    [(*c, "reference") for c in EXACT_CASES]
    + [(*c, "cpu") for c in EXACT_CASES if c[-1] == 16],  # the CPU path needs Dv = D
)
def test_all_exact_is_sdpa(n, tile, causal, pad, dv, impl):
    """All tiles EXACT is exact softmax attention (GQA, odd lengths, padding, Dv != D)."""
    b, h, hkv, d = 2, 4, 2, 16
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=n + tile)
    valid = key_padding(b, n, pad) if pad else None
    mask = dense_allowed(n, causal, valid)
    m = -(-n // tile)
    lv = visible_table(b, hkv, m, causal)
    s = d**-0.5
    out = run(impl, q, k, v, lv, scale=s, causal=causal, tile=tile, key_valid=valid)
    assert out.shape == (b, h, n, dv)
    golden = sdpa(q.double(), k.double(), v.double(), mask, s)
    assert_golden(out, golden, sdpa(q, k, v, mask, s))
    if pad == "left" and causal:  # rows that see only padding are 0, as in SDPA
        assert bool((out[1, :, : n // 3 + 1] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_exact_and_none_is_block_sparse_sdpa(causal, impl):
    """EXACT/NONE only equals SDPA with the block mask the table stands for (per KV head)."""
    b, h, hkv, n, d, tile = 2, 4, 2, 200, 16, 16
    q, k, v = qkv(b, h, hkv, n, d, d, seed=7)
    m = -(-n // tile)
    lv = random_table(b, hkv, m, causal, [EXACT, NONE], seed=3)
    assert bool((lv == NONE).any()) and bool((lv == EXACT).any())
    tok = torch.arange(n) // tile
    blocks = lv[:, :, tok][:, :, :, tok] == EXACT  # [B, Hkv, N, N]
    mask = blocks.repeat_interleave(h // hkv, dim=1)
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    s = d**-0.5
    out = run(impl, q, k, v, lv, scale=s, causal=causal, tile=tile)
    golden = sdpa(q.double(), k.double(), v.double(), mask, s)
    assert_golden(out, golden, sdpa(q, k, v, mask, s))


def linear_attention(q, k, v, phi, key_valid, causal):
    """``phi(q) (phi(K)^T V) / (phi(q) phi(K)^T 1)``, causal by a cumulative sum."""
    rep = q.shape[1] // k.shape[1]
    pk = phi(k.repeat_interleave(rep, 1)) * key_valid[:, None, :, None].to(q.dtype)
    vv = v.repeat_interleave(rep, 1)
    pq = phi(q)
    if causal:
        kv = torch.einsum("bhnf,bhnd->bhnfd", pk, vv).cumsum(2)
        num = torch.einsum("bhnf,bhnfd->bhnd", pq, kv)
        den = torch.einsum("bhnf,bhnf->bhn", pq, pk.cumsum(2))
    else:
        num = pq @ (pk.transpose(-1, -2) @ vv)
        den = pq @ pk.sum(2)[..., None]
        den = den[..., 0]
    return num / den[..., None]


def test_all_state_is_linear_attention():
    """Bidirectional, every tile STATE, exact finite feature map: linear attention.

    (A STATE tile contributes all its keys, so a causal diagonal tile cannot be
    STATE; the causal forms are the tile-1 and mixed tests below.)
    """
    b, h, hkv, n, d, dv, tile = 2, 4, 2, 63, 16, 24, 16
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=11)
    valid = key_padding(b, n, "right")
    lv = visible_table(b, hkv, -(-n // tile), False, fill=STATE)
    out = tiled_attention_from_levels(
        q, k, v, lv, scale=d**-0.5, causal=False, tile=tile, key_valid=valid, state_phi=elu1
    )
    golden = linear_attention(q.double(), k.double(), v.double(), elu1, valid, False)
    assert_golden(out, golden, linear_attention(q, k, v, elu1, valid, False))


def test_tile_one_state_is_causal_linear_attention():
    """With T = 1 the diagonal tile is one token, so causal all-STATE is causal linear attention."""
    b, h, hkv, n, d, dv = 1, 4, 2, 63, 8, 12
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=5)
    valid = torch.ones(b, n, dtype=torch.bool)
    lv = visible_table(b, hkv, n, True, fill=STATE)
    out = tiled_attention_from_levels(
        q, k, v, lv, scale=d**-0.5, causal=True, tile=1, state_phi=elu1
    )
    golden = linear_attention(q.double(), k.double(), v.double(), elu1, valid, True)
    assert_golden(out, golden, linear_attention(q, k, v, elu1, valid, True))


def _ssd_minimal_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = pathlib.Path(root) / "modules" / "ssd_minimal.py"
        if p.is_file():
            return p
    return None


def _load_ssd_minimal(path: pathlib.Path):
    """``ssd_minimal_discrete`` and ``segsum`` from mamba_ssm's file, without its imports.

    The module imports mamba_ssm's CUDA/Triton kernels at the top (for its own
    test); the two functions need only torch and einops, so they are compiled
    from the file's source alone.
    """
    tree = ast.parse(path.read_text())
    keep = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ("segsum", "ssd_minimal_discrete")
    ]
    if len(keep) != 2:
        return None
    einops = pytest.importorskip("einops", reason="ssd_minimal.py needs einops")
    ns = {"torch": torch, "F": F, "rearrange": einops.rearrange, "repeat": einops.repeat}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)
    return ns["ssd_minimal_discrete"]


def test_tile_one_state_matches_mamba2_ssd_minimal():
    """The same causal all-STATE plan against Mamba-2's ``ssd_minimal_discrete`` (no decay)."""
    path = _ssd_minimal_path()
    if path is None:
        pytest.skip("mamba_ssm/modules/ssd_minimal.py not found: mamba_ssm is not installed")
    ssd_minimal_discrete = _load_ssd_minimal(path)
    if ssd_minimal_discrete is None:
        pytest.skip(f"{path} has no segsum/ssd_minimal_discrete")

    b, h, hkv, n, d, dv, block = 1, 4, 2, 64, 8, 12, 16
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=5)
    lv = visible_table(b, hkv, n, True, fill=STATE)
    out = tiled_attention_from_levels(
        q, k, v, lv, scale=d**-0.5, causal=True, tile=1, state_phi=elu1
    )

    def ssd(q, k, v):
        """One head at a time (one group): X = [v, 1], B = phi(k), C = phi(q), A = 0."""
        ys = []
        for hi in range(h):
            g = hi // (h // hkv)
            x = torch.cat([v[:, g], torch.ones_like(v[:, g, :, :1])], -1)[:, :, None]
            bb = elu1(k[:, g])[:, :, None]
            cc = elu1(q[:, hi])[:, :, None]
            a = torch.zeros(b, n, 1, dtype=q.dtype)  # log decay 0: gamma = 1
            y, _ = ssd_minimal_discrete(x, a, bb, cc, block)
            ys.append(y[:, :, 0, :-1] / y[:, :, 0, -1:])  # numerator / normaliser
        return torch.stack(ys, 1)

    assert_golden(out, ssd(q.double(), k.double(), v.double()), ssd(q, k, v))


def test_causal_diagonal_exact_older_state():
    """Causal: own tile EXACT (masked inside), older tiles STATE, one normaliser.

    ``y_t = (sum_{s in tile(t), s<=t} e^{s q.k} v + phi(q).S) / (sum e^{s q.k} + phi(q).z)``.
    """
    b, h, hkv, n, d, dv, tile = 2, 4, 2, 63, 16, 8, 16
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=2, scale=0.7)
    m = -(-n // tile)
    lv = visible_table(b, hkv, m, True, fill=STATE)
    lv[..., torch.eye(m, dtype=torch.bool)] = EXACT
    s = d**-0.5

    def reference(q, k, v):
        rep = h // hkv
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        tok = torch.arange(n)
        same = (tok[:, None] // tile == tok[None, :] // tile) & (tok[None, :] <= tok[:, None])
        older = tok[None, :] // tile < tok[:, None] // tile
        w = torch.exp(s * q @ kk.transpose(-1, -2)) * same
        w = w + (elu1(q) @ elu1(kk).transpose(-1, -2)) * older
        return (w @ vv) / w.sum(-1, keepdim=True)

    out = tiled_attention_from_levels(q, k, v, lv, scale=s, causal=True, tile=tile, state_phi=elu1)
    assert_golden(out, reference(q.double(), k.double(), v.double()), reference(q, k, v))


@pytest.mark.parametrize(
    "features,impl", [("prf", "reference"), ("elu", "reference"), ("prf", "cpu")]
)
@pytest.mark.parametrize("causal", [True, False])
def test_every_level_kind_matches_the_formula(causal, features, impl):
    """EXACT, every POOL level, STATE and NONE mixed per KV head: the tile-by-tile formula.

    Checks the pyramid bank (means over valid keys, log-count bias), the
    gather, GQA sharing of the table, and the log-scale stabiliser of the PRF
    state with its one shared normaliser.
    """
    b, h, hkv, n, d, tile = 2, 4, 2, 100, 16, 16
    dv = d if impl == "cpu" else 8
    q, k, v = qkv(b, h, hkv, n, d, dv, seed=13, scale=0.7)
    valid = key_padding(b, n, "left")
    valid[0, 37:42] = False  # a hole inside a tile: partial counts in the summaries
    m = -(-n // tile)
    lv = random_table(b, hkv, m, causal, [EXACT, 1, 2, 3, 4, STATE, NONE], seed=1)
    s = d**-0.5
    if features == "prf":
        proj = random_features(d, 32, hkv, seed=0, device="cpu", dtype=torch.float64)
        kw, phi = {"feature_proj": proj}, prf(proj, s)
    else:
        kw, phi = {"state_phi": elu1}, (lambda x, g: elu1(x))
    out = run(impl, q, k, v, lv, scale=s, causal=causal, tile=tile, key_valid=valid, **kw)
    args = {"levels": lv, "scale": s, "causal": causal, "tile": tile, "key_valid": valid}
    golden = loop_reference(q.double(), k.double(), v.double(), phi=phi, **args)
    assert_golden(out, golden, loop_reference(q, k, v, phi=phi, **args))


def pair_table(lv, jq0=0):
    """``lv`` with each pair of query tiles ``(2p, 2p + 1)`` sharing the first one's entries
    before ``2p`` and the second reading tile ``2p`` exactly (rows of two tiles)."""
    lv = lv.clone()
    mq = lv.shape[2]
    for r in range(0, mq - 1):
        t = jq0 + r
        if t % 2 == 0:
            lv[:, :, r + 1, :t] = lv[:, :, r, :t]
            lv[:, :, r + 1, t] = EXACT
    return lv


@pytest.mark.parametrize("n, pad", [(100, "left"), (112, None), (128, "left"), (200, "right")])
def test_rows_of_two_tiles_run_as_one_block(monkeypatch, n, pad):
    """A table whose pairs of query tiles read the same entries (rows of 2*T queries over
    key tiles of T) runs on the CPU path as one block of 2*G*T queries per pair, own
    block causal over 2*T keys: the same outputs as the tile-by-tile formula, with every
    level kind, the state, key padding, GQA, an even and an odd number of tiles (a
    padding partner); a table without that structure runs one tile a row."""
    b, h, hkv, d, tile = 2, 4, 2, 16, 16
    q, k, v = qkv(b, h, hkv, n, d, d, seed=21, scale=0.7)
    valid = None if pad is None else key_padding(b, n, pad)
    m = -(-n // tile)
    lv = pair_table(random_table(b, hkv, m, True, [EXACT, 1, 2, STATE, NONE], seed=3))
    s = d**-0.5
    proj = random_features(d, 32, hkv, seed=0, device="cpu", dtype=torch.float64)
    seen = []
    pair_rows = cpu._pair_rows
    monkeypatch.setattr(cpu, "_pair_rows", lambda *a: seen.append(r := pair_rows(*a)) or r)
    out = cpu.tiled_attention_cpu(q, k, v, lv, scale=s, causal=True, tile=tile,
                                  key_valid=valid, feature_proj=proj)
    assert seen and seen[0] is not None, "the pair path did not run"
    args = {"levels": lv, "scale": s, "causal": True, "tile": tile, "key_valid": valid}
    phi = prf(proj, s)
    golden = loop_reference(q.double(), k.double(), v.double(), phi=phi, **args)
    assert_golden(out, golden, loop_reference(q, k, v, phi=phi, **args))
    # one pair a chunk (the padding partner of an odd count in the last one)
    one = cpu.tiled_attention_cpu(q, k, v, lv, scale=s, causal=True, tile=tile,
                                  key_valid=valid, feature_proj=proj, chunk_bytes=1)
    assert_golden(one, golden, loop_reference(q, k, v, phi=phi, **args))
    # one entry of one second row differs: no longer pairs, the tile-by-tile path
    broken = lv.clone()
    broken[0, 0, 3, 0] = NONE if int(broken[0, 0, 3, 0]) != NONE else EXACT
    seen.clear()
    out = cpu.tiled_attention_cpu(q, k, v, broken, scale=s, causal=True, tile=tile,
                                  key_valid=valid, feature_proj=proj)
    assert seen == [None]
    args["levels"] = broken
    golden = loop_reference(q.double(), k.double(), v.double(), phi=phi, **args)
    assert_golden(out, golden, loop_reference(q, k, v, phi=phi, **args))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [False, True])
def test_tile_of_equal_keys_pooled_is_exact(pad, impl):
    """A tile whose keys are all equal, pooled at any level (down to one summary), is EXACT."""
    b, h, hkv, n, d, tile = 2, 4, 2, 128, 16, 16
    q, k, v = qkv(b, h, hkv, n, d, 16, seed=3)
    k[:, :, 2 * tile : 3 * tile] = k[:, :, 2 * tile : 2 * tile + 1].clone()
    k[:, :, 5 * tile : 6 * tile] = k[:, :, 5 * tile + 3 : 5 * tile + 4].clone()
    valid = None
    if pad:  # padded keys inside the pooled tiles: the counts shrink, still exact
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[1, 2 * tile + 3 : 2 * tile + 9] = False
        valid[0, 6 * tile - 5 : 6 * tile] = False
    m = n // tile
    lv = visible_table(b, hkv, m, True)
    lv[:, :, 3:, 2] = 4  # one summary of 16 keys
    lv[:, :, 6:, 5] = 2  # four summaries
    lv[:, 1, 7, 5] = 1
    s = d**-0.5
    out = run(impl, q, k, v, lv, scale=s, causal=True, tile=tile, key_valid=valid)
    mask = dense_allowed(n, True, valid)
    golden = sdpa(q.double(), k.double(), v.double(), mask, s)
    assert_golden(out, golden, sdpa(q, k, v, mask, s))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nq, pad, runs", [(300, None, False), (237, "left", False),
                                           (300, None, True), (237, "left", True)])
def test_chunking_does_not_change_the_result(impl, nq, pad, runs):
    """Processing query tiles in chunks (bounded scratch) gives the same output: bit for
    bit in the reference; to rounding in the CPU path, whose chunks are trimmed to their
    own longest entry list (the flash kernel's blocks then fall differently). Also with
    fewer queries than keys, starting inside a tile, and key padding (the CPU path
    writes each chunk's rows into the output's layout). ``runs``: each row's STATE
    tiles one contiguous run, as the run-time rule makes them (the CPU path then takes
    each chunk's state sums from prefix sums)."""
    q, k, v = qkv(2, 4, 2, 300, 16, 16, seed=9)
    q = q[:, :, 300 - nq:]
    valid = None if pad is None else key_padding(2, 300, pad)
    m = -(-300 // 16)
    lv = random_table(2, 2, m, True, [EXACT, 1, 3, STATE, NONE], seed=4)
    if runs:  # tiles 1 .. j/2 of row j folded, nothing else
        lv = lv.masked_fill(lv == STATE, 1)
        j, i = torch.arange(m)[:, None], torch.arange(m)[None, :]
        lv = lv.masked_fill((i >= 1) & (i <= j // 2) & (i < j), STATE)
    lv = lv[:, :, (300 - nq) // 16:]  # the rows of the query tiles
    proj = random_features(16, 16, 2, seed=0, device="cpu", dtype=torch.float32)
    kw = {"scale": 0.25, "causal": True, "tile": 16, "feature_proj": proj, "key_valid": valid}
    whole = run(impl, q, k, v, lv, **kw)
    chunked = run(impl, q, k, v, lv, chunk_bytes=1, **kw)  # one query tile a chunk
    tol = 0 if impl == "reference" else 4 * torch.finfo(q.dtype).eps
    torch.testing.assert_close(chunked, whole, rtol=tol, atol=tol)
    if impl == "cpu":  # and the same as the reference arithmetic
        torch.testing.assert_close(chunked, run("reference", q, k, v, lv, **kw),
                                   rtol=1e-5, atol=1e-5)


def test_prf_state_is_unbiased():
    """All-STATE PRF attention approaches softmax attention as F grows (error ~ 1/sqrt F)."""
    q, k, v = qkv(1, 2, 2, 256, 16, 16, seed=1, dtype=torch.float64, scale=0.5)
    lv = visible_table(1, 2, 16, False, fill=STATE)
    ref = exact_attention(q, k, v, None, 0.25, False)
    errs = []
    for f in (16, 1024):
        proj = random_features(16, f, 2, seed=0, device="cpu", dtype=torch.float64)
        out = tiled_attention_from_levels(
            q, k, v, lv, scale=0.25, causal=False, tile=16, feature_proj=proj
        )
        errs.append(float((out - ref).norm() / ref.norm()))
    assert errs[1] < errs[0] / 3, errs


# ---------------------------------------------------------------------------
# numerics


def _params(budget=0.25, tile=16, window=2, anchors=1, features=16, **kw):
    return TileParams(
        tile=tile,
        window=window,
        anchors=anchors,
        horizon=kw.get("horizon"),
        budget=budget,
        budget_reads=kw.get("budget_reads"),
        state_features=features,
    )


def _in_value_range(out, v):
    """Softmax-like outputs are convex combinations of (mean) values."""
    rep = out.shape[1] // v.shape[1]
    vv = v.repeat_interleave(rep, 1).float()
    lo = vv.amin(2, keepdim=True)
    hi = vv.amax(2, keepdim=True)
    tol = 1e-5 * vv.abs().amax()
    o = out.float()
    return bool(((o >= lo - tol) & (o <= hi + tol)).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_huge_logits_stay_finite(causal, impl):
    """Logits of size 1e4 (q, k times 100): the budgeted plan and STATE tiles stay finite."""
    n = 384
    q, k, v = qkv(1, 4, 2, n, 16, 16, seed=0)
    q, k = q * 100, k * 100
    fast = cpu if impl == "cpu" else None
    for budget in (0.25, 0.1):  # pooled summaries; at 0.1 the state as well
        st = {}
        out = tiled_attention(
            q,
            k,
            v,
            None,
            scale=0.25,
            is_causal=causal,
            params=_params(budget, features=8),
            stats=st,
            fast=fast,
        )
        lv = st["levels"]
        assert st["path"] == "tiled" and bool(((lv > 0) | (lv == STATE)).any())
        assert bool((lv == STATE).any()) or budget > 0.1
        assert bool(torch.isfinite(out).all()) and _in_value_range(out, v)
    m = n // 16
    lv = random_table(1, 2, m, causal, [EXACT, 2, 4, STATE, STATE, NONE], seed=0)
    proj = random_features(16, 16, 2, seed=0, device="cpu", dtype=torch.float32)
    out = run(impl, q, k, v, lv, scale=0.25, causal=causal, tile=16, feature_proj=proj)
    assert bool(torch.isfinite(out).all()) and _in_value_range(out, v)
    # all-EXACT stays exact at this size too
    lv = visible_table(1, 2, m, causal)
    out = run(impl, q, k, v, lv, scale=0.25, causal=causal, tile=16)
    mask = dense_allowed(n, causal, None)
    golden = sdpa(q.double(), k.double(), v.double(), mask, 0.25)
    assert_golden(out, golden, sdpa(q, k, v, mask, 0.25))


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero_like_sdpa(impl):
    """A bool mask with an all-False row gives 0 there (as SDPA), the other rows as SDPA."""
    q, k, v = qkv(2, 4, 2, 256, 16, 16, seed=1)
    mask = torch.ones(256, 256, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, 70] = False
    mask[0, :, 200] = False
    st = {}
    fast = cpu if impl == "cpu" else None
    out = tiled_attention(
        q, k, v, mask, scale=0.25, is_causal=False, params=_params(), stats=st, fast=fast
    )
    assert st["path"] == "tiled"
    ref = sdpa(q, k, v, mask, 0.25)
    assert bool((out[1, :, 70] == 0).all()) and bool((out[0, :, 200] == 0).all())
    torch.testing.assert_close(out[1, :, 70], ref[1, :, 70])
    # every key of batch 1 padding: the whole batch is 0
    valid = torch.ones(2, 256, dtype=torch.bool)
    valid[1] = False
    lv = visible_table(2, 2, 16, True)
    out = run(impl, q, k, v, lv, scale=0.25, causal=True, tile=16, key_valid=valid)
    assert bool((out[1] == 0).all()) and bool(torch.isfinite(out).all())


def test_single_token():
    """N = 1: the output is the one value (fallback and explicit table alike)."""
    q, k, v = qkv(2, 4, 2, 1, 16, 8, seed=0)
    want = v.repeat_interleave(2, 1)
    st = {}
    out = tiled_attention(q, k, v, None, scale=0.25, is_causal=True, params=_params(), stats=st)
    assert st["path"] == "exact"
    torch.testing.assert_close(out, want)
    lv = torch.full((2, 2, 1, 1), EXACT, dtype=torch.int8)
    out = tiled_attention_from_levels(q, k, v, lv, scale=0.25, causal=True, tile=16)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, impl):
    """fp16/bf16 in, same dtype out, finite; all-EXACT within the golden scheme of SDPA."""
    q, k, v = qkv(1, 4, 2, 200, 16, 16, seed=4, dtype=dtype)
    fast = cpu if impl == "cpu" else None
    out = tiled_attention(q, k, v, None, scale=0.25, is_causal=True, params=_params(), fast=fast)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    lv = visible_table(1, 2, -(-200 // 16), True)
    out = run(impl, q, k, v, lv, scale=0.25, causal=True, tile=16)
    assert out.dtype == dtype
    mask = dense_allowed(200, True, None)
    golden = sdpa(q.double(), k.double(), v.double(), mask, 0.25)
    assert_golden(out, golden, sdpa(q, k, v, mask, 0.25))


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_are_fully_written(monkeypatch, impl):
    """``torch.empty`` filled with NaN: no output element is left uninitialised."""
    real_empty = torch.empty
    calls = []

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        calls.append(t.shape)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    for n, nq in ((63, 63), (500, 500), (200, 1)):
        q, k, v = qkv(2, 4, 2, n, 16, 16, seed=n)
        q = q[:, :, n - nq :]
        valid = key_padding(2, n, "right")
        mk = -(-n // 16)
        lv = visible_table(2, 2, mk, True)[:, :, (n - nq) // 16 :]
        out = run(impl, q, k, v, lv, scale=0.25, causal=True, tile=16, key_valid=valid)
        mask = dense_allowed(n, True, valid)[..., n - nq :, :]
        golden = sdpa(q.double(), k.double(), v.double(), mask, 0.25)
        assert_golden(out, golden, sdpa(q, k, v, mask, 0.25))
    assert calls, "the kernel no longer allocates with torch.empty: update this test"


# ---------------------------------------------------------------------------
# the run-time level rule


def _smooth_keys(b, h, n, d, seed):
    """Keys varying smoothly with position at per-tile random rates (density that varies)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64)[:, None] / n
    f = torch.randn(b, h, 1, d, generator=g, dtype=torch.float64) * 4
    ph = torch.rand(b, h, 1, d, generator=g, dtype=torch.float64) * 2 * math.pi
    return torch.sin(2 * math.pi * f * t + ph)


def _min_reads(levels_visible, fixed, tile, features):
    """The cheapest plan the rule allows per row: fixed tiles exact, the rest 1 read or the state."""
    n_fixed = (levels_visible & fixed).sum(-1).double()
    n_mid = (levels_visible & ~fixed).sum(-1).double()
    cheapest = torch.minimum(n_mid, torch.full_like(n_mid, features)) if features else n_mid
    return n_fixed * tile + cheapest


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    tiles=st.integers(24, 64),
    cut=st.integers(0, 31),
    tile=st.sampled_from([16, 32]),
    budget=st.sampled_from([0.5, 0.25, 0.1]),
    features=st.sampled_from([0, 8, 64, 256]),
    window=st.integers(1, 2),
    anchors=st.integers(0, 2),
    causal=st.booleans(),
    seed=st.integers(0, 1000),
    row_tiles=st.sampled_from([1, 2]),
)
def test_budget_rule(tiles, cut, tile, budget, features, window, anchors, causal, seed,
                     row_tiles):
    """Reads stay within the budget (or the rule's cheapest plan), never above exact;
    near field and anchors EXACT; nothing above the diagonal when causal; rows of two
    tiles too (a pair whose share of the budget cannot pay its cheapest plan stays two
    rows; tests/test_api.py checks the pairs of a payable table)."""
    b, hkv, d = 1, 2, 8
    n = tiles * tile - cut % tile
    m = -(-n // tile)
    k = _smooth_keys(b, hkv, n, d, seed)
    k = F.pad(k, (0, 0, 0, m * tile - n))
    validp = F.pad(torch.ones(b, n, dtype=torch.bool), (0, m * tile - n), value=False)
    params = dataclasses.replace(_params(budget, tile, window, anchors, features),
                                 row_tiles=row_tiles)
    lv = build_levels(
        tile_density(k, validp, tile),
        torch.arange(m),
        params,
        causal=causal,
        window=None,
        tile_valid=validp.reshape(b, m, tile).any(-1),
        nk=n,
    )
    j = torch.arange(m)[:, None]
    i = torch.arange(m)[None, :]
    seen = (i <= j) if causal else torch.ones(m, m, dtype=torch.bool)
    assert bool((lv[..., ~seen] == NONE).all())
    fixed = ((j - i).abs() < window) | (i < anchors)
    # near field and anchors always EXACT; a middle tile may be dropped (NONE) when it
    # wants less than one read
    assert bool((lv[..., seen & fixed] == EXACT).all())
    seen = seen.expand_as(lv)

    reads = level_reads(lv, tile, features)  # [B, Hkv, mq]
    exact = seen.sum(-1).double() * tile
    assert bool((reads <= exact).all()), "a plan costs more than exact attention"
    floor = _min_reads(seen, fixed, tile, features)
    allowed = max(budget * float(exact.sum()), float(floor.sum()))
    assert float(reads.sum()) <= allowed * (1 + 1e-9), (float(reads.sum()), allowed)


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_reported_reads_within_budget(budget):
    """At N = 2048, T = 32 the reported reads per query stay within the budget.

    The budget counts whole tiles, the report counts tokens: their ratio is at
    most ``(N + T) / (N + 1)``.
    """
    n, tile = 2048, 32
    q, k, v = qkv(1, 2, 2, n, 8, 8, seed=0)
    st = {}
    params = _params(budget, tile, window=1, anchors=0, features=16)
    tiled_attention(q, k, v, None, scale=8**-0.5, is_causal=True, params=params, stats=st)
    assert st["path"] == "tiled"
    ratio = st["reads_per_query"] / st["exact_reads_per_query"]
    assert ratio <= budget * (n + tile) / (n + 1), ratio


def test_more_budget_never_hurts():
    """On structured data (keys and values smooth in position) the error falls with the budget.

    With a narrow state (F = 16) the lowest budgets fold old tiles into it and
    higher ones replace it by summaries; without it (F = 0) only summaries refine.
    """
    b, h, n, d = 1, 2, 768, 16
    budgets = [0.1, 0.15, 0.2, 0.3, 0.5]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g) * 1.5
    k = (_smooth_keys(b, h, n, d, 10) * 2).float()
    v = _smooth_keys(b, h, n, d, 20).float()
    for causal in (True, False):
        ref = exact_attention(q, k, v, None, d**-0.5, causal)
        for features in (0, 16):
            errs = []
            for budget in budgets:
                out = tiled_attention(
                    q,
                    k,
                    v,
                    None,
                    scale=d**-0.5,
                    is_causal=causal,
                    params=_params(budget, 16, 2, 1, features),
                )
                errs.append(float((out - ref).norm() / ref.norm()))
            for lo, hi in zip(errs, errs[1:], strict=False):
                assert hi <= 1.1 * lo, (causal, features, errs)


def test_exact_fallbacks_say_why():
    q, k, v = qkv(1, 4, 2, 64, 16, 16, seed=0)
    cases = [
        ((q, k, v, None), _params(1.0), "budget 1.0"),
        ((q, k, v, None), _params(0.25, tile=32, window=2), "near field"),
        ((q[:, :, 10:], k, v, None), _params(), "cross-attention"),
        ((q, k, v, torch.randn(64, 64)), _params(), "bias"),
    ]
    for args, params, reason in cases:
        st = {}
        out = tiled_attention(*args, scale=0.25, is_causal=False, params=params, stats=st)
        assert st["path"] == "exact" and reason in st["reason"]
        torch.testing.assert_close(out, exact_attention(*args, 0.25, False))


@pytest.mark.parametrize("sharpness", [0.0, 4.0])
@pytest.mark.parametrize("budget", [0.08, 0.2, 0.45, 40, 64])
def test_level_solvers_agree(budget, sharpness):
    """The exact sort-based solver (the GPU's), the bisection (the CPU's) and the bisection
    over each row's highest-priority tiles only (the CPU's at few reads a query), by the
    mass estimate or by density over distance, give one table. An int budget is reads a
    query, with pairs the coarsest level: few enough that a row can afford a small share
    of its tiles."""
    g = torch.Generator().manual_seed(int(budget * 100) + int(sharpness))
    T, n, hkv = 16, 16 * 40 + 5, 3
    q = torch.randn(2, 6, n, 16, generator=g)
    k = torch.randn(2, hkv, n, 16, generator=g) * torch.rand(1, hkv, n, 1, generator=g) * 3
    mk = -(-n // T)
    kc = torch.nn.functional.pad(k, (0, 0, 0, mk * T - n))
    valid = torch.arange(mk * T) < n
    valid = valid.expand(2, -1).clone()
    valid[1, :37] = False  # left padding in one row
    reads = isinstance(budget, int)
    p = TileParams(tile=T, window=2, anchors=1, horizon=None, budget=1.0 if reads else budget,
                   budget_reads=budget if reads else None, state_features=16,
                   sharpness=sharpness, max_level=1 if reads else None)
    imp = tile_importance(q, kc, valid, T, 0.25, True, n) if sharpness > 0 else None
    dens = tile_density(kc, valid, T)
    tables = [
        build_levels(dens, torch.arange(mk), p, causal=True, window=None,
                     tile_valid=valid.reshape(2, mk, T).any(-1), nk=n, importance=imp,
                     solver=solver)
        for solver in ("bisect", "sort", "topk")
    ]
    assert tables[0].shape == (2, hkv, mk, mk)
    assert (tables[0] > 0).any(), "the budget should coarsen some tiles"
    for other in tables[1:]:
        assert torch.equal(tables[0], other)


@pytest.mark.parametrize("max_level", [0, 1, 2, None])
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_max_level_caps_the_pooled_levels(budget, max_level):
    """No kept tile is read coarser than ``max_level``: the rule drops it instead, and the
    reads it saves go to the other tiles (the row still spends its allowance, the
    exact tiles are a superset of those at every level). Past the horizon without a
    state a tile keeps its one summary whatever the cap."""
    g = torch.Generator().manual_seed(11)
    T, n, hkv = 16, 16 * 40, 2
    q = torch.randn(1, 4, n, 16, generator=g)
    k = torch.randn(1, hkv, n, 16, generator=g) * torch.rand(1, hkv, n, 1, generator=g) * 3
    mk = n // T
    valid = torch.ones(1, n, dtype=torch.bool)
    imp = tile_importance(q, k, valid, T, 0.25, True, n)

    def table(level_cap, **kw):
        p = TileParams(tile=T, window=2, anchors=1, horizon=kw.get("horizon"), budget=budget,
                       budget_reads=None, state_features=kw.get("F", 16), max_level=level_cap)
        return build_levels(None, torch.arange(mk), p, causal=True, window=None,
                            tile_valid=valid.reshape(1, mk, T).any(-1), nk=n, importance=imp)

    capped, full = table(max_level), table(None)
    cap = 4 if max_level is None else max_level
    kept = capped >= 0
    assert int(capped[kept].max()) <= cap
    reads, reads_full = level_reads(capped, T, 16), level_reads(full, T, 16)
    # each row's allowance, from the contract (README step 5): its exact reads, its fixed
    # tiles and the cheapest view of the rest (one read per middle tile, or the state)
    j, i = torch.arange(mk)[:, None], torch.arange(mk)[None, :]
    vis = i <= j
    fixed = vis & ((j - i < 2) | (i < 1))
    n_mid = (vis & ~fixed).sum(-1).double()
    allow = _allowance(vis.sum(-1).double() * T,
                       fixed.sum(-1).double() * T + n_mid.clamp(max=16.0), budget)
    assert float(allow.sum()) < 0.5 * float(vis.sum()) * T  # the budget binds
    assert bool((reads <= allow + 1e-9).all()) and bool((reads_full <= allow + 1e-9).all())
    assert bool((allow - reads < T).sum() > mk // 2)  # most rows spend it to within a tile
    # and it is spent: the capped rule moves in coarser steps (a dropped tile read at the
    # cap is T / 2**cap reads, and tied estimates move together), so only roughly
    assert float(reads.sum()) >= 0.9 * float(reads_full.sum())
    assert bool(((full == EXACT) <= (capped == EXACT)).all()), "a capped row lost an exact tile"
    if max_level is not None and max_level < 4:
        assert bool(((full > cap) & (capped == NONE)).any()), "nothing was dropped by the cap"
    # no state, a horizon: the tiles past it are read as one summary each
    past = table(max_level, horizon=3, F=0)
    beyond = (past == 4)
    assert bool(beyond.any()) and int(past[(past >= 0) & ~beyond].max()) <= cap


def test_default_solver_bounds_the_sort_scratch():
    """The exact sort solver runs on CUDA only while its [.., mk, R + 1] scratch is small;
    long contexts (tile 32, 64k tokens: 3 x 2048 x 2048 tables) take the bisection."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_solver(cuda, 3 * 128 * 128, 5) == "sort"  # 8k tokens, tile 64
    assert default_solver(cuda, 3 * 2048 * 2048, 5) == "bisect"  # 64k tokens, tile 32
    assert default_solver(cpu, 3 * 128 * 128, 5) == "bisect"


def test_tiles_wanting_less_than_one_read_are_dropped_lowest_mass_first():
    """At a low budget the rule drops middle tiles (NONE) rather than give each a summary,
    and within a row no dropped tile has more estimated mass than a tile it kept."""
    g = torch.Generator().manual_seed(5)
    T, n, hkv = 16, 16 * 48, 2
    q = torch.randn(1, 4, n, 16, generator=g)
    k = torch.randn(1, hkv, n, 16, generator=g) * 2
    mk = n // T
    valid = torch.ones(1, n, dtype=torch.bool)
    p = TileParams(tile=T, window=2, anchors=1, horizon=None, budget=0.08,
                   budget_reads=None, state_features=0)
    imp = tile_importance(q, k, valid, T, 0.25, True, n)
    lv = build_levels(None, torch.arange(mk), p, causal=True, window=None,
                      tile_valid=valid.reshape(1, mk, T).any(-1), nk=n, importance=imp)
    j = torch.arange(mk)[:, None]
    i = torch.arange(mk)[None, :]
    middle = (i <= j) & ((j - i) >= 2) & (i >= 1)
    dropped = (lv == NONE) & middle
    kept = (lv >= 0) & middle
    assert bool(dropped.any()) and bool(kept.any())
    for h in range(hkv):
        for r in range(mk):
            d, kk = dropped[0, h, r], kept[0, h, r]
            if d.any() and kk.any():
                assert float(imp[0, h, r][d].max()) <= float(imp[0, h, r][kk].min()) + 1e-12


@pytest.mark.parametrize("shape", [(2, 3, 37, 5, 4), (1, 1, 1, 3), (1, 2, 16, 8), (2, 1, 33, 2)])
def test_prefix_sums_over_tiles(shape):
    """The CPU path's blocked prefix sums equal a cumulative sum with a zero row in front,
    for tile counts that are and are not a multiple of the block."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.cat([torch.zeros_like(x[:, :, :1]), x.cumsum(2)], 2)
    torch.testing.assert_close(cpu._prefix_sums(x), want, rtol=0, atol=1e-12)
