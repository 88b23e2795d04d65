"""Attention op time: nanite tiled attention against SDPA, measured side by side.

    python benchmarks/speed.py                      # CPU, N = 4k..16k
    python benchmarks/speed.py --lengths 4096 8192 16384 32768 --budgets 0.25 0.1
    python benchmarks/speed.py --device cuda        # CUDA, bf16, N = 4k..32k
    python benchmarks/speed.py --lengths 8192 16384 32768 65536 --budgets --budget-reads 1024

Prints one table: per length and budget, SDPA time, tiled time, speedup, the
realised key reads per query against the original's, and the fitted exponent
of time against N (time ~ N**p) over the lengths measured. Timings are the
median of ``--repeat`` runs after a warm-up, in one process, so ratios are
comparable even on a shared machine.

On CUDA, SDPA is pinned to its flash kernel (K/V repeated to the query heads
beforehand, outside the timing), the tiled op runs the Triton kernel
(``kernels/triton_attn.py``), times come from CUDA events, and three more
columns appear: the kernel alone on the op's level table (without the run-time
level rule), the implementation that ran, and the peak memory of each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from nanite_compile import NaniteConfig
from nanite_compile.kernels import cpu as cpu_kernels
from nanite_compile.kernels.levels import DEFAULT_SHARPNESS, SELECTS, STATE, TileParams
from nanite_compile.kernels.ops import _params as _op_params
from nanite_compile.kernels.reference import random_features, tiled_attention

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _median_time(fn, repeat: int, device: str = "cpu") -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _fit_exponent(ns: list[int], ts: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    xs = [math.log(n) for n in ns]
    ys = [math.log(t) for t in ts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _measure(n, args, dev, dtype, fast, rows, series, sdpa_series) -> None:
    """Time SDPA and the tiled op at length ``n`` for every budget; append table rows."""
    scale = args.head_dim ** -0.5
    q = torch.randn(1, args.heads, n, args.head_dim, device=dev, dtype=dtype)
    k = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype)
    v = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype)
    t_sdpa = m_sdpa = None
    if n <= args.sdpa_max:
        if dev == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            rep = args.heads // args.kv_heads
            kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        else:
            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        t_sdpa = _median_time(sdpa, args.repeat, dev)
        m_sdpa = _peak_mib(sdpa, dev)
        sdpa_series[0].append(n)
        sdpa_series[1].append(t_sdpa)
    for b in _settings(args):
        p = _plan(args, b)
        stats: dict = {}

        def tiled(p=p, stats=stats):
            return tiled_attention(q, k, v, None, scale=scale, is_causal=True, params=p,
                                   stats=stats, fast=fast)

        t_tiled = _median_time(tiled, args.repeat, dev)
        series[b][0].append(n)
        series[b][1].append(t_tiled)
        ratio = stats["reads_per_query"] / stats["exact_reads_per_query"]
        computed = stats.get("computed_per_query", stats["reads_per_query"])
        row = [n, _label(b), f"{t_sdpa * 1e3:.2f}" if t_sdpa else "-", f"{t_tiled * 1e3:.2f}",
               f"{t_sdpa / t_tiled:.2f}x" if t_sdpa else "-", f"{ratio:.3f}",
               f"{computed / stats['exact_reads_per_query']:.3f}"]
        if dev == "cuda" and p.select == "query":  # no Triton kernel for it: PyTorch ran
            row += ["-", stats.get("impl", "?"),
                    "-" if m_sdpa is None else f"{m_sdpa:.0f}", f"{_peak_mib(tiled, dev):.0f}"]
        elif dev == "cuda":
            lv = stats["levels"]
            proj = None
            if bool((lv == STATE).any()):
                proj = random_features(args.head_dim, args.head_dim, args.kv_heads, 0, dev,
                                       torch.float32)

            def kernel(lv=lv, proj=proj):
                return fast.run(q, k, v, lv, scale=scale, causal=True, tile=args.tile,
                                feature_proj=proj)

            t_kernel = _median_time(kernel, args.repeat, dev)
            row += [f"{t_kernel * 1e3:.2f}", stats.get("impl", "?"),
                    "-" if m_sdpa is None else f"{m_sdpa:.0f}", f"{_peak_mib(tiled, dev):.0f}"]
        rows.append(row)


def _settings(args) -> list:
    """What each row keeps: the ``--budgets`` fractions (floats), then the
    ``--budget-reads`` key reads per query (ints)."""
    return list(args.budgets) + [int(r) for r in args.budget_reads]


def _label(b) -> str:
    return f"{b} reads" if isinstance(b, int) else f"{b}"


def _plan(args, budget) -> TileParams:
    """The plan the op would run for these options (decoded as the op decodes its
    arguments: ``--max-level -1`` is every level). ``budget``: a share of the causal
    reads (float), or an absolute number of key reads per query (int)."""
    max_level = -1 if args.max_level is None else args.max_level
    frac, reads = (1.0, budget) if isinstance(budget, int) else (budget, 0)
    return _op_params(args.tile, args.window, args.anchors, -1, frac, reads, args.head_dim,
                      DEFAULT_SHARPNESS, max_level, args.select, args.row_tiles)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="default fp32 on cpu, bf16 on cuda (SDPA's flash kernel needs half)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="default 4k 8k 16k on cpu, 4k 8k 16k 32k on cuda")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.1],
                    help="shares of the causal key reads kept (the cost stays a share of N^2)")
    ap.add_argument("--budget-reads", type=int, nargs="*", default=[],
                    help="key reads per query kept, whatever N (NaniteConfig.budget_reads: "
                         "the cost grows linearly in N)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    defaults = NaniteConfig()
    ap.add_argument("--tile", type=int, default=defaults.tile,
                    help="tile size (default: what NaniteConfig picks for these heads: 32 "
                         "with 3 or more query heads per KV head, else 64)")
    ap.add_argument("--window", type=int, default=defaults.window,
                    help="near field in tiles (default: 128 tokens, or 4 tiles of a set --tile)")
    ap.add_argument("--anchors", type=int, default=defaults.anchors,
                    help="anchor tiles (default: 32 tokens, at least one tile, or 2 tiles of a set --tile)")
    ap.add_argument("--max-level", type=int, default=defaults.max_level,
                    help=f"coarsest pooled level (default {defaults.max_level}; -1: every level)")
    ap.add_argument("--select", choices=SELECTS, default=defaults.select,
                    help="row: one table row per query tile; query: each query its own tiles "
                         "(reads/orig is what a query reads, computed/orig what its row computes)")
    ap.add_argument("--row-tiles", type=int, choices=(1, 2), default=defaults.row_tiles,
                    help="query tiles per level table row (2: pairs of tiles share one "
                         "choice and run as one block)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sdpa-max", type=int, default=32768, help="longest N to run SDPA at")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, profile one tiled call per budget at the longest N: "
                         "time per stage (nanite.* ranges) and the top operators")
    args = ap.parse_args(argv)
    # the tiling a conversion would pick for these head counts (NaniteConfig.tiling)
    args.tile, args.window, args.anchors = NaniteConfig(
        tile=args.tile, window=args.window, anchors=args.anchors).tiling(args.heads, args.kv_heads)
    from tabulate import tabulate

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = _DTYPES[args.dtype or ("bf16" if dev == "cuda" else "fp32")]
    lengths = args.lengths or ([4096, 8192, 16384, 32768] if dev == "cuda" else [4096, 8192, 16384])
    if dev == "cuda":
        from nanite_compile.kernels import triton_attn as fast

        if not fast.available():
            raise SystemExit("--device cuda: triton is not installed")
    else:
        fast = cpu_kernels
    torch.manual_seed(0)
    rows = []
    series: dict = {b: ([], []) for b in _settings(args)}
    sdpa_series: tuple[list, list] = ([], [])
    for n in lengths:
        _measure(n, args, dev, dtype, fast, rows, series, sdpa_series)
    threads = f"{torch.get_num_threads()} threads" if dev == "cpu" else torch.cuda.get_device_name()
    print(f"causal attention, B=1, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
          f"tile={args.tile}, window={args.window}, anchors={args.anchors}, max_level={args.max_level}, select={args.select}, row_tiles={args.row_tiles}, {str(dtype).removeprefix('torch.')}, {threads}, device={dev}")
    headers = ["N", "budget", "SDPA ms", "tiled ms", "speedup", "reads/orig", "computed/orig"]
    if dev == "cuda":
        headers += ["kernel ms", "impl", "SDPA MiB", "tiled MiB"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    exps = [["SDPA", _fit_exponent(*sdpa_series)]]
    exps += [[f"tiled, budget {_label(b)}", _fit_exponent(*series[b])] for b in _settings(args)]
    print()
    print(tabulate([[name, "-" if e is None else f"{e:.2f}"] for name, e in exps],
                   headers=["time ~ N**p", "p"], tablefmt="github"))
    if args.profile:
        _profile(max(lengths), args, dev, dtype, fast)


def _profile(n, args, dev, dtype, fast) -> None:
    """Where one tiled call's time goes: the ``nanite.*`` stage ranges and the top ops."""
    from tabulate import tabulate
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(1, args.heads, n, args.head_dim, device=dev, dtype=dtype)
    k = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype)
    v = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for b in _settings(args):
        p = _plan(args, b)

        def call(p=p):
            out = tiled_attention(q, k, v, None, scale=args.head_dim ** -0.5, is_causal=True,
                                  params=p, fast=fast)
            if dev == "cuda":
                torch.cuda.synchronize()
            return out

        call()  # compile / warm up
        with profile(activities=acts) as prof:
            call()
        events = prof.key_averages()
        dev_attr = "device_time_total" if dev == "cuda" else None
        rows = []
        for e in sorted(events, key=lambda e: -e.cpu_time_total):
            if e.key.startswith("nanite."):
                rows.append([e.key, e.count, f"{e.cpu_time_total / 1e3:.2f}",
                             "-" if dev_attr is None else f"{getattr(e, dev_attr) / 1e3:.2f}"])
        print()
        print(f"profile, N={n}, budget {_label(b)}: stages (wall on the host; device time inside)")
        print(tabulate(rows, headers=["stage", "calls", "host ms", "device ms"],
                       tablefmt="github"))
        sort_by = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort_by, row_limit=15))


if __name__ == "__main__":
    main()
