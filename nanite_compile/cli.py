"""The ``nanite-compile`` command.

    nanite-compile convert MODEL [--budget 0.25] [--calibration TEXT] [--output DIR] [--report DIR]
    nanite-compile report DIR [--json] [--html OUT]
    nanite-compile eval MODEL TEXT [--tokens 2048] [--budget 0.25] [--nanite DIR] [--chunk N]
    nanite-compile bench [-- ARGS for benchmarks/speed.py]

``MODEL`` is a Hugging Face model directory (``save_pretrained``) or a
``.gguf`` file; nothing is downloaded. Errors are one line on stderr,
``nanite-compile: error: ...``, saying what to do, with exit status 2
(``--debug`` shows the traceback instead). Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROG = "nanite-compile"

# NaniteConfig options on the command line: (field, type, help)
_CONFIG_OPTIONS = [
    ("budget", float, "share of the original attention's key reads to keep, in (0, 1]"),
    ("budget_reads", int, "absolute key reads per query instead of --budget"),
    ("tile", int, "tile size in tokens, a power of two"),
    ("window", int, "near field in tiles (always exact)"),
    ("anchors", int, "leading 'attention sink' tiles (always exact)"),
    ("horizon", int, "most tiles seen beyond near field and anchors before the state"),
    ("state_features", int, "width of the recurrent state's feature map (0: no state)"),
    ("sharpness", float, "how sharply tile reads follow the estimated attention mass (0: old rule)"),
    ("max_level", int, "coarsest pooled level a kept tile is read at (default 1: pairs)"),
    ("select", str, "how a query's tiles are chosen: row (one table row per query tile, "
                    "the default) or query (each query its own exact tiles)"),
    ("row_tiles", int, "query tiles per level table row: 1, or 2 (a pair of tiles shares "
                       "one choice; faster, a little worse)"),
    ("max_error", float, "with --calibration: keep a site exact if its error stays above this"),
    ("objective", str, "with --calibration: plan by each site's effect on the model's output "
                       "(model, the default) or by its own attention error (site)"),
    ("plan_tokens", int, "with --calibration: the sequence length the cost model plans at; "
                         "longer calibration sequences are cut into pieces of it"),
    ("plan_check", bool, "with --calibration: keep the cost model's plan only if the calibration "
                         "text's loss is no worse than with the uniform budget"),
    ("seed", int, "seed of the random features"),
    ("impl", str, "operator implementation: auto, torch or triton"),
    ("chunk_bytes", int, "scratch memory bound of one chunk of query tiles"),
]
_DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """A mistake on the command line or in its files, with the fix in the message."""


# ------------------------------------------------------------------ helpers


class _Steps:
    """One progress bar over the named steps of a command (tqdm, to stderr, on a terminal)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        if quiet:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with the hf extra; plain lines without it
            return
        # disable=None: no bar when stderr is not a terminal (logs, pipes, tests)
        self.bar = tqdm(
            total=total,
            file=sys.stderr,
            unit="step",
            leave=False,
            disable=None,
            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]{bar:20}",
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str(name)
        elif not self.quiet:
            print(f"{PROG}: {name} ...", file=sys.stderr, flush=True)
        yield
        if self.bar is not None and not self.bar.disable:
            self.bar.update(1)
            self.bar.write(f"{PROG}: {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _config(args: argparse.Namespace):
    from .config import NaniteConfig

    opts = {
        name: getattr(args, name)
        for name, _, _ in _CONFIG_OPTIONS
        if getattr(args, name, None) is not None
    }
    try:
        return NaniteConfig.from_options(opts)
    except (TypeError, ValueError) as e:
        raise CliError(f"bad option: {e}") from None


def _model_location(path: str) -> tuple[Path, dict]:
    p = Path(path)
    if not p.exists():
        raise CliError(
            f"{path} not found: give a Hugging Face model directory (with config.json, as "
            "written by save_pretrained) or a .gguf file"
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CliError(
                f"{path} is a file but not a .gguf file: give a .gguf file or a Hugging Face "
                "model directory"
            )
        return p.parent, {"gguf_file": p.name}
    if not (p / "config.json").is_file():
        raise CliError(
            f"{path} has no config.json: give a directory written by save_pretrained "
            "(or a .gguf file)"
        )
    return p, {}


@contextlib.contextmanager
def _hf_bars(quiet: bool) -> Iterator[None]:
    """Hugging Face's own progress bars (weight loading) off under --quiet."""
    from transformers.utils import logging as hf_logging

    was_off = not hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        # the GGUF loader's de-quantizing bar ignores that switch: keep its stderr under --quiet
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        if quiet and not was_off:
            hf_logging.enable_progress_bar()


def _load_model(path: str, dtype: str, quiet: bool = False):
    import torch

    try:
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError:
        raise CliError(
            "loading a model needs the Hugging Face extra: pip install 'nanite-compile[hf]'"
        ) from None
    base, kw = _model_location(path)
    kw.update(dtype=getattr(torch, dtype), local_files_only=True)
    with _hf_bars(quiet):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(base), **kw)
        except ValueError:  # not a causal LM (an encoder, a vision model): its base model
            model = AutoModel.from_pretrained(str(base), **kw)
    return model.eval()


def _load_tokenizer(path: str, why: str):
    from transformers import AutoTokenizer

    base, kw = _model_location(path)
    try:
        return AutoTokenizer.from_pretrained(str(base), local_files_only=True, **kw)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(
            f"{why} needs the model's tokenizer, which could not be loaded from {base} "
            f"({first}); save it there with tokenizer.save_pretrained"
        ) from None


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{flag} {path}: no such file; give a UTF-8 text file") from None
    except UnicodeDecodeError:
        raise CliError(f"{flag} {path} is not UTF-8 text; give a UTF-8 text file") from None
    except IsADirectoryError:
        raise CliError(f"{flag} {path} is a directory; give a UTF-8 text file") from None


def _tokens(tokenizer, text: str, n: int, flag: str, exact: bool):
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        raise CliError(f"{flag}: the text has {ids.shape[1]} tokens; give a longer text")
    if ids.shape[1] < n:
        if exact:
            raise CliError(
                f"{flag}: the text has only {ids.shape[1]} tokens, fewer than --tokens {n}; "
                "give a longer text or a smaller --tokens"
            )
        print(
            f"{PROG}: note: {flag} has {ids.shape[1]} tokens, fewer than {n}; using them all",
            file=sys.stderr,
        )
    return ids[:, :n]


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise CliError(f"--{name} must be at least {minimum}, got {value}")


# ------------------------------------------------------------------ commands


def _cmd_convert(args: argparse.Namespace) -> int:
    import nanite_compile

    cfg = _config(args)  # before the model: a bad option fails at once
    _model_location(args.model)
    _positive("calibration-tokens", args.calibration_tokens, 2)
    text = _read_text(args.calibration, "--calibration") if args.calibration else None
    for d in (args.output, args.report):
        if d is not None and d.exists() and not d.is_dir():
            raise CliError(f"{d} exists and is not a directory; give a directory")
    steps = _Steps(
        2 + (text is not None) + (args.output is not None) + (args.report is not None), args.quiet
    )
    try:
        ids = None
        if text is not None:  # before the model: a missing tokenizer fails at once
            with steps.step("tokenizing the calibration text"):
                tok = _load_tokenizer(args.model, "--calibration")
                ids = _tokens(tok, text, args.calibration_tokens, "--calibration", exact=False)
        with steps.step("loading the model"):
            model = _load_model(args.model, args.dtype, args.quiet)
        with steps.step(f"converting (budget {cfg.budget:g})"):
            converted = nanite_compile.convert(model, config=cfg, calibration=ids)
        if args.output is not None:
            with steps.step(f"saving to {args.output}"):
                nanite_compile.save(converted, args.output, source=str(args.model))
        if args.report is not None:
            with steps.step(f"writing the report pages to {args.report}"):
                from .report_html import save_report

                page = save_report(
                    converted,
                    args.report,
                    calibration=ids,
                    heads=args.heads,
                    max_sites=args.report_sites,
                )
    finally:
        steps.close()
    rep = nanite_compile.report(converted)
    print(rep.to_json() if args.json else rep)
    if args.output is not None:
        print(f"saved: {args.output} (load with nanite_compile.load(directory, model))")
    if args.report is not None:
        print(f"report: {page}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .io import JSON_NAME, read_saved
    from .report import RewriteReport

    d = args.directory
    if (d / JSON_NAME).exists() or not (d / "report.json").exists():
        if not d.is_dir():
            raise CliError(f"{d} is not a directory; give one written by {PROG} convert --output")
        if not (d / JSON_NAME).exists():
            raise CliError(
                f"{d} holds no {JSON_NAME} or report.json; write one with "
                f"{PROG} convert MODEL --output {d}"
            )
        saved = read_saved(d)
        rep, meta = saved.report, saved.meta
    else:
        try:
            rep = RewriteReport.from_json((d / "report.json").read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as e:
            raise CliError(f"{d / 'report.json'} is not a nanite_compile report ({e})") from None
        meta = {}
    if args.json:
        print(rep.to_json())
    else:
        if meta.get("source"):
            print(
                f"saved from {meta['source']} with nanite_compile "
                f"{meta.get('nanite_compile_version')}"
            )
        print(rep)
    if args.html is not None:
        from .report_html import save_report

        page = save_report(rep, args.html)
        print(f"report: {page}")
    return 0


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    if n <= size:
        return []
    return [(s, min(s + size, n)) for s in range(0, n, size) if min(s + size, n) > max(s, 1)]


def _cmd_eval(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import nanite_compile

    from .evaluate import perplexity

    cfg = _config(args)
    _model_location(args.model)
    _positive("tokens", args.tokens, 2)
    _positive("range-size", args.range_size, 2)
    if args.chunk is not None:
        _positive("chunk", args.chunk, 1)
    text = _read_text(args.text, "TEXT")
    if args.nanite is not None:
        from .io import read_saved

        read_saved(args.nanite)  # damaged files fail before the model loads
    steps = _Steps(5, args.quiet)
    try:
        with steps.step("tokenizing the text"):
            ids = _tokens(
                _load_tokenizer(args.model, "eval"), text, args.tokens, "TEXT", exact=True
            )
        with steps.step("loading the model"):
            model = _load_model(args.model, args.dtype, args.quiet)
        ranges = _ranges(ids.shape[1], args.range_size)
        # a chunk as long as the text is one pass (and is reported as one)
        chunk = args.chunk if args.chunk is not None and args.chunk < ids.shape[1] else None
        with steps.step("perplexity of the original"):
            before = perplexity(model, ids, ranges=ranges, chunk=chunk)
        if args.nanite is not None:
            with steps.step(f"loading the conversion from {args.nanite}"):
                converted = nanite_compile.load(args.nanite, model)
        else:
            with steps.step(f"converting (budget {cfg.budget:g})"):
                converted = nanite_compile.convert(model, config=cfg)
        with steps.step("perplexity of the converted model"):
            after = perplexity(converted, ids, ranges=ranges, chunk=chunk)
    finally:
        steps.close()
    budget = converted.__dict__["_nanite_state"].config.budget

    def row(name, b, a):
        return [name, b, a, f"x{a / b:.3f}" if b else ""]

    rows = [row(f"perplexity, tokens 0-{ids.shape[1]}", before.ppl, after.ppl)]
    for rb, ra in zip(before.ranges, after.ranges, strict=True):
        rows.append(row(f"  tokens {rb.start}-{rb.end}", rb.ppl, ra.ppl))
    how = "" if chunk is None else f"; in chunks of {chunk} token{'s' * (chunk > 1)} on the KV cache"
    print(f"{args.text}: first {ids.shape[1]} tokens; budget {budget:g}{how}")
    print(
        tabulate(rows, headers=["", "original", "converted", "converted/original"], floatfmt=".3f")
    )
    if args.json is not None:
        out = {
            "tokens": ids.shape[1],
            "budget": budget,
            "chunk": chunk,
            "before": before.to_dict(),
            "after": after.to_dict(),
            "report": json.loads(nanite_compile.report(converted).to_json()),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def _benchmark_script(name: str) -> Path | None:
    """``benchmarks/<name>.py`` of the source checkout (not installed with the package)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        p = root / "benchmarks" / f"{name}.py"
        if p.is_file():
            return p
    return None


def _run_benchmark(command: str, name: str, args: argparse.Namespace) -> int:
    """Run ``benchmarks/<name>.py``'s ``main`` with the arguments after ``--``."""
    script = _benchmark_script(name)
    if script is None:
        raise CliError(
            f"{command} runs benchmarks/{name}.py, which is not installed with the package: run "
            "it from a source checkout of nanite_compile (git clone, then pip install -e .)"
        )
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    spec = importlib.util.spec_from_file_location(f"nanite_bench_{name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise CliError(f"{script} has no main(argv); update the source checkout")
    result = module.main(rest)
    return result if isinstance(result, int) else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    return _run_benchmark("bench", "speed", args)


def _cmd_quality(args: argparse.Namespace) -> int:
    return _run_benchmark("quality", "quality", args)


# ------------------------------------------------------------------ parser


def _add_config_options(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    """NaniteConfig's options; without ``calibration`` (a command that takes none) the
    options that only act with --calibration are left out."""
    from .config import IMPLS, OBJECTIVES, SELECTS, NaniteConfig

    defaults = NaniteConfig()
    g = p.add_argument_group("conversion options (NaniteConfig)")
    for name, typ, text in _CONFIG_OPTIONS:
        if not calibration and text.startswith("with --calibration"):
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        kw: dict[str, Any] = {
            "type": typ,
            "default": None,
            "dest": name,
            "help": f"{text} (default: {default})",
        }
        if typ is bool:  # --plan-check / --no-plan-check
            del kw["type"]
            kw["action"] = argparse.BooleanOptionalAction
        if name == "impl":
            kw["choices"] = IMPLS
        if name == "select":
            kw["choices"] = SELECTS
        if name == "row_tiles":
            kw["choices"] = (1, 2)
        if name == "objective":
            kw["choices"] = OBJECTIVES
        g.add_argument(flag, **kw)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a Hugging Face model directory (save_pretrained) or a .gguf file")
    p.add_argument(
        "--dtype",
        choices=_DTYPES,
        default="float32",
        help="parameter dtype to load the model in (default: float32)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    common.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error instead of one line",
    )

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Rewrite the attention of a model into tiled attention under a budget.",
        epilog=f"'{PROG} COMMAND --help' describes each command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser(
        "convert",
        parents=[common],
        help="convert a model, print its report, save it",
        description="Convert a Hugging Face model (directory or .gguf file), print the rewrite "
        "report, and optionally save the conversion (--output) and an HTML report (--report).",
    )
    _add_model_options(c)
    c.add_argument(
        "--calibration",
        type=Path,
        metavar="TEXTFILE",
        help="a UTF-8 text whose first tokens find and measure the attention sites "
        "(default: synthetic tokens)",
    )
    c.add_argument(
        "--calibration-tokens",
        type=int,
        default=1024,
        metavar="N",
        help="tokens of --calibration used (default: 1024)",
    )
    c.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="DIR",
        help="save the conversion here (nanite.json, nanite.safetensors)",
    )
    c.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write report.html with level-table and budget pictures here",
    )
    c.add_argument(
        "--report-sites",
        type=int,
        default=4,
        metavar="N",
        help="layers drawn in the report's level pictures (default: 4)",
    )
    c.add_argument(
        "--heads",
        type=int,
        nargs="+",
        default=[0],
        metavar="H",
        help="KV heads drawn in the level pictures (default: 0)",
    )
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_options(c)
    c.set_defaults(func=_cmd_convert)

    r = sub.add_parser(
        "report",
        parents=[common],
        help="print a saved report",
        description="Print the report saved by 'convert --output DIR' (or 'convert --report DIR').",
    )
    r.add_argument("directory", type=Path, metavar="DIR")
    r.add_argument("--json", action="store_true", help="print it as JSON")
    r.add_argument(
        "--html",
        type=Path,
        metavar="OUT",
        help="also write report.html and its pictures to OUT (level tables from the plans)",
    )
    r.set_defaults(func=_cmd_report)

    e = sub.add_parser(
        "eval",
        parents=[common],
        help="perplexity before and after conversion",
        description="Perplexity of the original and the converted model on the first --tokens "
        "tokens of a text file, overall and per --range-size token range.",
    )
    _add_model_options(e)
    e.add_argument("text", type=Path, metavar="TEXT", help="a UTF-8 text file")
    e.add_argument("--tokens", type=int, default=2048, help="tokens evaluated (default: 2048)")
    e.add_argument(
        "--range-size",
        type=int,
        default=1024,
        metavar="N",
        help="report perplexity per range of N tokens as well (default: 1024)",
    )
    e.add_argument(
        "--nanite",
        type=Path,
        metavar="DIR",
        help="load the conversion saved in DIR instead of converting",
    )
    e.add_argument(
        "--chunk",
        type=int,
        metavar="N",
        help="score in pieces of N tokens, each continuing the KV cache of the ones before "
        "(chunked prefill; default: one pass)",
    )
    e.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    _add_config_options(e, calibration=False)  # eval converts without calibration
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser(
        "bench",
        parents=[common],
        help="attention op speed against SDPA (benchmarks/speed.py)",
        description="Run benchmarks/speed.py of the source checkout. Its own options go after "
        f"'--', e.g. '{PROG} bench -- --lengths 4096 8192'; '{PROG} bench -- --help' lists them.",
    )
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks/speed.py")
    b.set_defaults(func=_cmd_bench)

    qa = sub.add_parser(
        "quality",
        parents=[common],
        help="perplexity of nanite against baselines at equal key budget (benchmarks/quality.py)",
        description="Run benchmarks/quality.py of the source checkout: SmolLM2 perplexity by token "
        "range for the original, nanite and the training-free baselines. Its own options go after "
        f"'--', e.g. '{PROG} quality -- --methods original nanite sliding --budgets 0.25'.",
    )
    qa.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks/quality.py")
    qa.set_defaults(func=_cmd_quality)
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run ``nanite-compile`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import AssetMissingError
    from .io import NaniteLoadError

    expected = (
        CliError,
        NaniteLoadError,
        AssetMissingError,
        OSError,
        ImportError,
        ValueError,
        TypeError,
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nanite-compile report DIR | head`: the reader left, not an error
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except expected as e:
        if args.debug:
            raise
        hint = "" if isinstance(e, (CliError, NaniteLoadError)) else " (--debug shows where)"
        print(f"{PROG}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
