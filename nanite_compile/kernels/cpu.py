"""The fast CPU path of tiled attention: fused softmax blocks merged by log-sum-exp.

Same math as ``tiled_attention_from_levels`` (the reference), arranged so that
almost all the work runs inside PyTorch's fused CPU flash-attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the
log-sum-exp of each row):

* the query's own tile: exact causal attention inside the tile, one batched
  call over all tiles, the ``G`` query heads of a KV head stacked into one
  block of ``G*T`` queries over the tile's ``T`` keys (the causal pattern a
  bias, so K/V are not repeated per head);
* every other entry the level table selects (exact keys of older tiles,
  pooled summaries): gathered per query tile, scored in one fused call with a
  per-entry additive bias ``log n`` (``-inf`` for padding); no per-query mask
  is needed since all of them lie strictly before the query tile;
* the STATE: ``phi(q)^T S_j`` with ``S_j`` a difference of prefix sums over
  tiles when each row's state tiles are contiguous (they are under the
  run-time rule), a masked sum otherwise;
* one normaliser: the three parts merge with weights ``exp(lse - M) / den``
  formed per query, then one weighted sum over the parts.

Memory is ``O(N * entries per query)``, processed in chunks of query tiles.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .levels import EXACT, NONE, STATE
from .reference import _check_query_keep, _log_features, pool_levels, state_tiles, tile_layout

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

# `run` takes a per-query selection (``query_keep``, NaniteConfig.select="query")
QUERY_KEEP = True


def supports(q: torch.Tensor, v: torch.Tensor, window: int | None) -> bool:
    """Whether the fast path applies: CPU, no sliding window, value width = key width."""
    return (q.device.type == "cpu" and window is None and v.shape[-1] == q.shape[-1]
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


class _StateRows:
    """Per query tile sums of the STATE tiles' ``phi(k)^T v`` and ``phi(k)``, taken for
    a range of rows at a time (`rows`): ``S_j [B, Hkv, rows, F, Dv]``, ``z_j``.

    When every row's STATE tiles form one contiguous run (they do under the run-time
    rule) a row's sums are a difference of two prefix sums over tiles, gathered for the
    rows asked for only: the rows' sums are never all in memory at once (at 64k tokens
    that is ``[B, Hkv, 2048, F, Dv]``, 100 MB, and three temporaries of that size).
    Otherwise a masked sum over tiles.
    """

    def __init__(self, smask: torch.Tensor, s_tile: torch.Tensor, z_tile: torch.Tensor):
        # smask [B, Hkv, mq, >= m]: the table's STATE entries; none lie past the m tiles
        # the sums cover
        smask = smask[..., :s_tile.shape[2]]
        mk = smask.shape[-1]
        cnt = smask.sum(-1)
        # each row's first STATE tile and one past its last, from the int8 table (argmax
        # gives the first maximum)
        flags = smask.to(torch.int8)
        lo = flags.argmax(-1)
        hi = mk - flags.flip(-1).argmax(-1)
        self.runs = bool((cnt == torch.where(cnt > 0, hi - lo, 0)).all())
        # which rows read a state at all (a chunk without one skips its read-out)
        self.live = cnt.reshape(-1, cnt.shape[-1]).amax(0).gt(0).tolist()
        if self.runs:
            self.cs, self.cz = _prefix_sums(s_tile), _prefix_sums(z_tile)
            self.lo = torch.where(cnt > 0, lo, 0)
            self.hi = torch.where(cnt > 0, hi, 0)
        else:
            self.m = smask.to(s_tile.dtype)
            self.s_tile, self.z_tile = s_tile, z_tile

    def rows(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.runs:
            m = self.m[:, :, r0:r1]
            return (torch.einsum("bhji,bhifd->bhjfd", m, self.s_tile),
                    torch.einsum("bhji,bhif->bhjf", m, self.z_tile))
        hi, lo = self.hi[:, :, r0:r1], self.lo[:, :, r0:r1]

        def take(c, i):
            return c.gather(2, i.reshape(*i.shape, *([1] * (c.dim() - 3))).expand(
                -1, -1, -1, *c.shape[3:]))

        return take(self.cs, hi) - take(self.cs, lo), take(self.cz, hi) - take(self.cz, lo)


def _prefix_sums(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Sums over tiles ``x [B, H, m, ...]`` up to each tile, with a zero row in front:
    ``[B, H, m + 1, ...]``. Within blocks of ``block`` tiles by one product with a lower
    triangle, then the blocks' carries: PyTorch's CPU cumsum over a middle dim took 2.5x
    as long (64k tokens, ``[1, 3, 2048, 64, 64]``: 168 ms against 68)."""
    b, h, m = x.shape[:3]
    rest = x.shape[3:]
    nb = -(-m // block)
    v = x.reshape(b * h, m, -1)
    if nb * block != m:
        v = F.pad(v, (0, 0, 0, nb * block - m))
    tri = torch.ones(block, block, dtype=x.dtype, device=x.device).tril()
    w = torch.matmul(tri, v.reshape(b * h, nb, block, -1))  # prefix sums inside each block
    w[:, 1:] += w[:, :, -1].cumsum(1)[:, :-1, None]  # plus the blocks before
    out = x.new_empty(b, h, m + 1, *rest)
    flat = out.view(b * h, m + 1, -1)
    flat[:, 0].zero_()
    flat[:, 1:].copy_(w.reshape(b * h, nb * block, -1)[:, :m])
    return out


def _state_rows(lv: torch.Tensor, s_tile: torch.Tensor, z_tile: torch.Tensor):
    """Every row's `_StateRows` sums at once (the Triton kernel reads them all)."""
    return _StateRows(lv == STATE, s_tile, z_tile).rows(0, lv.shape[2])


_WORKSPACE = threading.local()


def _workspace(slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable flat scratch tensor per thread and slot, at least ``numel`` long.

    The gathered entries are written into it instead of a fresh tensor: a fresh
    allocation of this size is new pages from the OS each call, and touching them
    cost 6x the copy itself (92 ms against 14 ms for 216 MB here). It holds at most
    about ``chunk_bytes`` per thread, plus the stacked level banks (`_stacked`: about
    1.5x the keys and values of the longest call), until the thread ends.
    """
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first needed under torch.inference_mode(): an inference
        # tensor cannot be written outside it, and the buffer outlives the call
        with torch.inference_mode(False):
            buf = bufs[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _take_rows(bank: torch.Tensor, idx: torch.Tensor, slot: int) -> torch.Tensor:
    """``bank[b, h, idx[b, h, i]]`` as ``[B, H, L, D]``: whole rows copied by one
    ``index_select`` into workspace ``slot`` (valid until that slot is next used; a
    ``gather`` with an index expanded over ``D`` reads an index per element and took
    3-4x longer)."""
    b, h, nb, d = bank.shape
    base = torch.arange(b * h, device=bank.device).reshape(b, h, 1) * nb
    flat_idx = (idx + base).reshape(-1)
    out = _workspace(slot, flat_idx.numel() * d, bank.dtype).view(-1, d)
    torch.index_select(bank.reshape(b * h * nb, d), 0, flat_idx, out=out)
    return out.reshape(b, h, -1, d)


def _stacked(parts: list[torch.Tensor], slot: int) -> torch.Tensor:
    """The level banks ``parts`` ``[B, Hkv, units_l, W]`` stacked along the units into
    workspace ``slot`` (one bank is returned as it is). Two levels of K or V at 8k
    tokens and 8 KV heads are 25 MB: fresh pages for that each call took 15-75 ms, more
    than the copy."""
    if len(parts) == 1:
        return parts[0]
    b, h, _, w = parts[0].shape
    units = sum(p.shape[2] for p in parts)
    out = _workspace(slot, b * h * units * w, parts[0].dtype).view(b, h, units, w)
    return torch.cat(parts, 2, out=out)


@dataclass
class _Entries:
    """Every row's entries before its own tile as one packed list of units.

    A unit is ``unit`` consecutive rows of a level's bank: with ``L`` the coarsest level
    present, ``T >> L`` keys or summaries, so a tile at level ``l`` is ``2**(L - l)``
    units. The present levels' banks are stacked into one bank of units (``bank_k``,
    ``bank_v`` ``[B, Hkv, units, unit * D]``, ``logc`` ``[B, units, unit]``); ``order``
    ``[B, Hkv, rows, width]`` lists each row's units (its tiles in order, each tile's
    units together, then index 0 as padding), ``units`` ``[B, Hkv, rows]`` how many are
    real and ``row_units`` ``[rows]`` the most over batch and heads.
    """

    unit: int
    bank_k: torch.Tensor
    bank_v: torch.Tensor
    logc: torch.Tensor
    order: torch.Tensor
    units: torch.Tensor
    row_units: torch.Tensor


def _unit_entries(rest: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor,
                  T: int, masked: bool) -> _Entries | None:
    """`_Entries` for the table ``rest`` (a level per (row, tile); NONE and STATE read
    nothing here) over the keys ``kc``, ``vc`` pooled by `pool_levels`; None when no row
    reads an entry. One list per row instead of one per level: a chunk of rows pads each
    list to its longest, and per level the longest rows differ (at 16k tokens, budget
    0.1, the per-level lists computed 1.22x the real entries, one list 1.03x).

    Built from the table's read entries only (one scan for them): at few reads a query
    the table is mostly NONE, and dense int64 passes over it (64k tokens: 3 x 2048 x
    2048) cost more than the attention they set up."""
    b, hkv, nr, mk = rest.shape
    dev = rest.device
    nz = (rest >= 0).nonzero(as_tuple=True)  # row-major: by (batch, head, row), then tile
    if not nz[0].numel():
        return None
    lev = rest[nz].to(torch.int64)
    present = torch.unique(lev).tolist()
    top = present[-1]
    unit = T >> top
    per = torch.zeros(top + 1, dtype=torch.int64, device=dev)  # units per tile, by level
    first = torch.zeros_like(per)  # the level's first unit in the stacked bank
    ks, vs, lcs, off = [], [], [], 0
    for lvl, km, vm, logc in pool_levels(kc, vc, valid, top, masked):
        if lvl not in present:
            continue
        n_u = 1 << (top - lvl)  # a tile's entries at this level, in units
        per[lvl], first[lvl] = n_u, off
        ks.append(km.reshape(b, hkv, mk * n_u, -1))
        vs.append(vm.reshape(b, hkv, mk * n_u, -1))
        lcs.append(logc.reshape(b, mk * n_u, unit))
        off += mk * n_u
    bank_k, bank_v = _stacked(ks, 4), _stacked(vs, 5)
    logc = lcs[0] if len(lcs) == 1 else torch.cat(lcs, 1)
    cnt = per[lev]  # units each read (row, tile) takes
    start = first[lev] + nz[3] * cnt  # the tile's first unit in the stacked bank
    row = (nz[0] * hkv + nz[1]) * nr + nz[2]
    units = torch.zeros(b * hkv * nr, dtype=torch.int64, device=dev).index_add_(0, row, cnt)
    # where a tile's units start in its row's list: units before it, less its row's start
    before = cnt.cumsum(0) - cnt
    pos = before - (units.cumsum(0) - units)[row]
    width = int(units.max())
    if bool((cnt == 1).all()):  # one unit per tile: no expansion
        unit_idx, slot, row_of = start, pos, row
    else:
        which = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt)
        j = torch.arange(which.numel(), device=dev) - before[which]
        unit_idx, slot, row_of = start[which] + j, pos[which] + j, row[which]
    order = torch.zeros(b * hkv * nr, width, dtype=torch.int64, device=dev)
    order[row_of, slot] = unit_idx
    units = units.reshape(b, hkv, nr)
    return _Entries(unit, bank_k, bank_v, logc, order.reshape(b, hkv, nr, width), units,
                    units.amax(dim=(0, 1)))


def _pair_rows(lv, valid, qc, kc, vc, jq0: int, T: int):
    """The table and inputs laid out as rows of two query tiles, or None.

    Applies when every pair of query tiles ``(2p, 2p + 1)`` (absolute, even first) reads
    the same entries before ``2p`` and the second reads tile ``2p`` exactly (as
    `build_levels` makes them with ``row_tiles=2``; a table without that structure runs
    one tile a row). An odd count gets a padding query tile at the end (its keys one
    padding tile, its output dropped). Returns ``(lv, valid, qc, kc, vc)`` with
    ``mq`` even.
    """
    b, hkv, mq, mk = lv.shape
    if jq0 % 2 or mq < 2:
        return None
    # the structure is checked on the real rows first: a table without it (the default
    # rule's) costs this comparison only, not the padding copies of q, k and v below
    npair = mq // 2
    a, z = lv[:, :, 0:2 * npair:2], lv[:, :, 1:2 * npair:2]
    first = jq0 + 2 * torch.arange(npair, device=lv.device)
    before = torch.arange(mk, device=lv.device) < first[:, None]  # [pairs, mk]
    if not bool(((a == z) | ~before).all()):
        return None
    own = z.gather(-1, first.reshape(1, 1, -1, 1).expand(b, hkv, -1, 1))[..., 0]
    tile_ok = valid.reshape(b, 1, mk, T).any(-1).gather(
        -1, first.reshape(1, 1, -1).expand(b, 1, -1))  # the first tile has a valid key
    if not bool(((own == EXACT) | ((own == NONE) & ~tile_ok)).all()):
        return None
    if mq % 2:  # a padding partner for the last tile: its table is its partner's
        lv = F.pad(lv, (0, 1), value=NONE)
        extra = lv[:, :, -1:].clone()
        extra[..., mk] = EXACT
        lv = torch.cat([lv, extra], 2)
        valid = F.pad(valid, (0, T), value=False)
        kc = F.pad(kc, (0, 0, 0, T))
        vc = F.pad(vc, (0, 0, 0, T))
        qc = F.pad(qc, (0, 0, 0, 0, 0, 0, 0, 1))
    return lv, valid, qc, kc, vc


def tiled_attention_cpu(
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
    query_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tiled attention for a given level table; arguments as the reference's.

    The causal diagonal tile must be EXACT (the run-time rule guarantees it).
    With ``query_keep`` (a per-query selection) the entries' bias is per query:
    ``[rows, G*T, P]`` instead of one row per query tile.

    Rows (query tiles) run in chunks: each chunk's own tile, entries and state are
    scored, merged under one normaliser and written into the output, so no
    full-length intermediate is allocated besides the output itself (fresh memory
    of that size costs more to touch than to fill: ``_workspace``).
    """
    cd, b, h, nq, d, hkv, nk, dv, G, T, mk, jq0, mq, qpad_front, valid, kc, vc, qc = \
        tile_layout(q, k, v, key_valid, tile)  # qc: [B,Hkv,mq,G,T,D], a view
    _check_query_keep(levels, query_keep)
    dev = q.device

    lv = levels  # int8: the table is only scanned here (a 64k-token table is 12 MB, not 100)
    mq_real = mq
    rest = lv
    R = 1  # query tiles per executed row
    if causal:
        dl = torch.diagonal(lv, offset=jq0, dim1=2, dim2=3)  # [B, Hkv, mq]: each row's own tile
        if not bool(((dl == EXACT) | ((dl == NONE) & (key_valid is not None))).all()):
            raise ValueError("the causal diagonal tile must be EXACT (or all padding)")
        paired = _pair_rows(lv, valid, qc, kc, vc, jq0, T) if query_keep is None else None
        if paired is not None:
            # two query tiles share one row of the table (rows of 64 queries over key tiles
            # of 32): they run as one block of 2*G*T queries over the same entries
            R = 2
            lv, valid, qc, kc, vc = paired
            mk, mq = lv.shape[-1], lv.shape[2]
        nr = mq // R  # executed rows
        first = jq0 + R * torch.arange(nr, device=dev)  # each row's first query tile
        rows_lv = lv[:, :, ::R]
        # everything a row reads before its own block of R tiles
        rest = rows_lv.masked_fill(torch.arange(mk, device=dev) >= first[:, None], NONE)
    else:
        nr, rows_lv = mq, lv
    QB, KB = R * G * T, R * T

    own = None
    if causal:
        # own block: causal inside its R tiles, with the padding keys masked. The G query
        # heads of a KV head are stacked into one block of R*G*T queries over the block's
        # R*T keys with the causal pattern as a bias (repeating K/V per head cost 2x)
        kt = kc.reshape(b, hkv, mk, T, d)[:, :, jq0:jq0 + mq].reshape(b, hkv, nr, KB, d)
        vt = vc.reshape(b, hkv, mk, T, dv)[:, :, jq0:jq0 + mq].reshape(b, hkv, nr, KB, dv)
        tri = torch.ones(KB, KB, dtype=torch.bool, device=dev).tril()
        # queries in (tile of the row, head, position) order; query r*T + t sees keys <= it
        tri = tri.reshape(R, 1, T, KB).expand(R, G, T, KB).reshape(QB, KB)
        if key_valid is None:
            allow = tri[None, None, None]  # one pattern for every row: [1, 1, 1, QB, KB]
        else:
            vt_ok = valid.reshape(b, 1, mk, T)[:, :, jq0:jq0 + mq].reshape(b, 1, nr, 1, KB)
            allow = tri & vt_ok  # [B, 1, nr, QB, KB]
        own_bias = torch.zeros(allow.shape, dtype=cd, device=dev).masked_fill_(~allow, -math.inf)
        own = (kt, vt, allow, own_bias)

    entries = _unit_entries(rest, kc, vc, valid, T, key_valid is not None)

    state = None
    smask = rows_lv == STATE
    folded = smask.any(2).any(1).any(0)  # [mk]: tiles some row reads as state
    if bool(folded.any()):
        # the state sums over tiles up to the last folded one only (older tiles fold first:
        # at 64k tokens and 2048 reads a query, rows fold at most the oldest 224 of 2048)
        m_s = int(folded.nonzero().max()) + 1
        proj = feature_proj.to(cd)
        s_tile, z_tile, ck = state_tiles(kc[:, :, :m_s * T], vc[:, :, :m_s * T],
                                         valid[:, :m_s * T], proj, scale, T)
        state = (proj, ck.reshape(b, hkv, 1, 1, 1), _StateRows(smask, s_tile, z_tile))

    # the result in its final layout; each chunk's rows are written into it once
    res = torch.empty(b, h, mq_real * T, dv, dtype=cd, device=dev)
    res_t = res.view(b, hkv, G, mq_real, T, dv)
    # rows are processed in chunks: the packed lists trimmed to the chunk's longest,
    # and as many rows as fit the scratch bound, so the early rows (which see few
    # tiles) do not pay for the longest row's padding
    per_entry = b * hkv * ((d + dv + 1) * cd.itemsize * 2 + QB * 8)
    per_row = b * hkv * QB * (d + 2 * dv + 4) * cd.itemsize * 3  # own, entries, state
    bidx = torch.arange(b, device=dev).reshape(b, 1, 1, 1)
    c0 = 0
    while c0 < nr:
        left = torch.arange(1, nr - c0 + 1, device=dev)
        cost = left * per_row
        if entries is not None:
            run_max = entries.row_units[c0:].cummax(0).values  # units of the chunk's widest row
            cost = cost + run_max * entries.unit * left * per_entry
        n_c = max(1, int((cost <= chunk_bytes).sum()))
        c1 = c0 + n_c
        rows = b * hkv * n_c
        # the chunk's queries as [B, Hkv, n_c, QB, D], copied into scratch
        qr = _workspace(2, b * hkv * n_c * QB * d, cd).view(b, hkv, n_c, R, G, T, d)
        qr.copy_(qc[:, :, c0 * R:c1 * R].reshape(b, hkv, n_c, R, G, T, d))
        qr = qr.view(b, hkv, n_c, QB, d)
        parts_o, parts_l = [], []
        if own is not None:
            kt, vt, allow, own_bias = own
            ob = own_bias[:, :, c0:c1] if own_bias.shape[2] > 1 else own_bias
            ob = ob.expand(b, hkv, n_c, QB, KB).reshape(rows, 1, QB, KB)
            od, ld = _flash(qr.reshape(rows, 1, QB, d),
                            kt[:, :, c0:c1].reshape(rows, 1, KB, d),
                            vt[:, :, c0:c1].reshape(rows, 1, KB, dv),
                            0.0, False, attn_mask=ob, scale=scale)
            ld = ld.reshape(b, hkv, n_c, QB)
            od = od.reshape(b, hkv, n_c, QB, dv)
            if key_valid is not None:
                # the kernel reports lse 0 for a row with nothing to attend to: make it -inf
                nothing = ~allow[:, :, c0:c1].any(-1).expand(b, hkv, n_c, QB)
                ld = ld.masked_fill(nothing, -math.inf)
                od = od.masked_fill(nothing[..., None], 0.0)
            parts_o.append(od)
            parts_l.append(ld)
        E = int(run_max[n_c - 1]) if entries is not None else 0
        if E:  # the chunk's rows read entries before their own tile: one packed list each
            U = entries.unit  # keys (or summaries) per unit
            P = E * U
            tl = entries.order[:, :, c0:c1, :E]  # [B,Hkv,n_c,E] unit indices, then padding
            has = torch.arange(E, device=dev) < entries.units[:, :, c0:c1, None]
            kg = _take_rows(entries.bank_k, tl.reshape(b, hkv, -1), 0)
            vg = _take_rows(entries.bank_v, tl.reshape(b, hkv, -1), 1)
            # log count of each entry (-inf for padding keys and for list padding)
            bias = entries.logc[bidx, tl].masked_fill_(~has[..., None], -math.inf)  # [..,E,U]
            if query_keep is None:
                o, lse = _flash(
                    qr.reshape(rows, 1, QB, d),
                    kg.reshape(rows, 1, P, d),
                    vg.reshape(rows, 1, P, dv),
                    0.0, False,
                    attn_mask=bias.reshape(rows, 1, 1, P),
                    scale=scale,
                )
                empty = ~(bias > -math.inf).reshape(b, hkv, n_c, 1, P).any(-1)
            else:
                # a bias per query, shared by the G heads of its position: the heads are
                # the kernel's head axis over K/V expanded without a copy (stacking them
                # instead needs a G-times larger bias: 1.6x the time). The table holds
                # EXACT tiles only (checked), so a unit is a tile
                sel = query_keep[:, :, c0:c1].gather(
                    -1, tl[:, :, :, None, :].expand(-1, -1, -1, T, -1))  # [B,Hkv,n_c,T,E]
                bias = bias[:, :, :, None].expand(-1, -1, -1, T, -1, -1).masked_fill(
                    ~sel[..., None], -math.inf)
                o, lse = _flash(
                    qr.reshape(rows, G, T, d),
                    kg.reshape(rows, 1, P, d).expand(rows, G, P, d),
                    vg.reshape(rows, 1, P, dv).expand(rows, G, P, dv),
                    0.0, False,
                    attn_mask=bias.reshape(rows, 1, T, P),
                    scale=scale,
                )
                empty = ~(bias > -math.inf).reshape(b, hkv, n_c, T, P).any(-1)
                empty = empty[:, :, :, None, :].expand(b, hkv, n_c, G, T).reshape(
                    b, hkv, n_c, G * T)
            o = o.reshape(b, hkv, n_c, QB, dv)
            lse = lse.reshape(b, hkv, n_c, QB)
            if bool(empty.any()):  # nothing to attend to: weight 0 (the kernel gives 0/0)
                empty = empty.expand(b, hkv, n_c, QB)
                lse = lse.masked_fill(empty, -math.inf)
                o = o.masked_fill(empty[..., None], 0.0)
            parts_o.append(o)
            parts_l.append(lse)

        num_s = den_s = m_s = None
        if state is not None and any(state[2].live[c0:c1]):
            proj, ck, sums = state
            s_c, z_c = sums.rows(c0, c1)  # [B,Hkv,n_c,F,Dv], [B,Hkv,n_c,F]
            lq = _log_features(qr, proj, scale) + ck  # [B,Hkv,n_c,QB,F]
            has_s = (z_c > 0).any(-1)[..., None]  # [B,Hkv,n_c,1]
            m_s = torch.where(has_s, lq.amax(-1), torch.full_like(lq[..., 0], -math.inf))
            wq = torch.exp(lq - torch.where(torch.isfinite(m_s), m_s, 0.0)[..., None])
            num_s = torch.einsum("bhcqf,bhcfd->bhcqd", wq, s_c)
            den_s = torch.einsum("bhcqf,bhcf->bhcq", wq, z_c)

        # one normaliser over all parts: each part's weight exp(lse - M) / den is formed on
        # the small [.., QB] tensors, then the output is one weighted sum of the parts (no
        # unnormalised accumulator divided over [.., QB, Dv]); rows that see nothing get 0
        out = _workspace(3, b * hkv * n_c * QB * dv, cd).view(b, hkv, n_c, QB, dv)
        logs = parts_l + ([m_s] if m_s is not None else [])
        if not logs:
            out.zero_()
        else:
            M = torch.stack(logs).amax(0)
            M = torch.where(torch.isfinite(M), M, 0.0)
            terms = [(o, torch.exp(lse - M)) for o, lse in zip(parts_o, parts_l, strict=True)]
            den = sum(a for _, a in terms)
            if m_s is not None:  # num_s / den_s are unnormalised sums at scale exp(m_s)
                a_s = torch.exp(m_s - M)
                terms.append((num_s, a_s))
                den = den + a_s * den_s
            inv = torch.where(den > 0, 1.0 / den.clamp_min(torch.finfo(cd).tiny), 0.0)
            torch.mul(terms[0][0], (terms[0][1] * inv)[..., None], out=out)
            for o, a in terms[1:]:
                out.addcmul_(o, (a * inv)[..., None])
        # rows of R query tiles back to one row per tile (the padding tile of an odd count
        # dropped), heads apart, into the result
        t0, t1 = c0 * R, min(c1 * R, mq_real)
        res_t[:, :, :, t0:t1].copy_(
            out.view(b, hkv, n_c * R, G, T, dv)[:, :, :t1 - t0].permute(0, 1, 3, 2, 4, 5))
        c0 = c1
    return res[:, :, qpad_front:qpad_front + nq].to(q.dtype)


# the name the driver (``reference.tiled_attention(fast=...)``) calls
run = tiled_attention_cpu
