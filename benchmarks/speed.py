"""Attention op time: nanite tiled attention against SDPA, measured side by side.

    python benchmarks/speed.py                      # CPU, N = 4k..16k
    python benchmarks/speed.py --lengths 4096 8192 16384 32768 --budgets 0.25 0.1

Prints one table: per length and budget, SDPA time, tiled time, speedup, the
realised key reads per query against the original's, and the fitted exponent
of time against N (time ~ N**p) over the lengths measured. Timings are the
median of ``--repeat`` runs after a warm-up, in one process, so ratios are
comparable even on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from nanite_compile.kernels.levels import TileParams
from nanite_compile.kernels import cpu as cpu_kernels
from nanite_compile.kernels.reference import tiled_attention


def _median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fit_exponent(ns: list[int], ts: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    xs = [math.log(n) for n in ns]
    ys = [math.log(t) for t in ts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sdpa-max", type=int, default=32768, help="longest N to run SDPA at")
    args = ap.parse_args(argv)
    from tabulate import tabulate

    torch.manual_seed(0)
    rows = []
    series: dict[float, tuple[list, list]] = {b: ([], []) for b in args.budgets}
    sdpa_series: tuple[list, list] = ([], [])
    for n in args.lengths:
        q = torch.randn(1, args.heads, n, args.head_dim)
        k = torch.randn(1, args.kv_heads, n, args.head_dim)
        v = torch.randn(1, args.kv_heads, n, args.head_dim)
        t_sdpa = None
        if n <= args.sdpa_max:
            t_sdpa = _median_time(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True), args.repeat)
            sdpa_series[0].append(n)
            sdpa_series[1].append(t_sdpa)
        for b in args.budgets:
            p = TileParams(tile=args.tile, window=2, anchors=1, horizon=None, budget=b,
                           budget_reads=None, state_features=args.head_dim)
            stats: dict = {}
            t_tiled = _median_time(lambda: tiled_attention(
                q, k, v, None, scale=args.head_dim ** -0.5, is_causal=True, params=p,
                stats=stats, fast=cpu_kernels), args.repeat)
            series[b][0].append(n)
            series[b][1].append(t_tiled)
            ratio = stats["reads_per_query"] / stats["exact_reads_per_query"]
            rows.append([n, b, f"{t_sdpa * 1e3:.1f}" if t_sdpa else "-", f"{t_tiled * 1e3:.1f}",
                         f"{t_sdpa / t_tiled:.2f}x" if t_sdpa else "-", f"{ratio:.3f}"])
    print(f"causal attention, B=1, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
          f"tile={args.tile}, fp32, {torch.get_num_threads()} threads, device=cpu")
    print(tabulate(rows, headers=["N", "budget", "SDPA ms", "tiled ms", "speedup",
                                  "reads/orig"], tablefmt="github"))
    exps = [["SDPA", _fit_exponent(*sdpa_series)]]
    exps += [[f"tiled, budget {b}", _fit_exponent(*series[b])] for b in args.budgets]
    print()
    print(tabulate([[name, "-" if e is None else f"{e:.2f}"] for name, e in exps],
                   headers=["time ~ N**p", "p"], tablefmt="github"))


if __name__ == "__main__":
    main()
