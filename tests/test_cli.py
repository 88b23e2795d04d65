"""The ``nanite-compile`` command (issue 5, "CLI").

``main([...])`` on a tiny Hugging Face Llama written with ``save_pretrained``
next to a tiny word-level tokenizer: convert (with calibration text, saving
the conversion and the HTML report), report, eval (loading the saved
conversion), bench; errors are one line with exit status 2; ``--help`` on
every command, and the installed console script answers ``--help``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nanite_compile import cli

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402  (after the importorskip)

tokenizers = pytest.importorskip("tokenizers")

VOCAB = 128
COMMANDS = ("convert", "report", "eval", "bench")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama and its word-level tokenizer in one save_pretrained directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=VOCAB).save_pretrained(d)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("text") / "words.txt"
    p.write_text(" ".join(f"w{rng.randrange(1, VOCAB)}" for _ in range(400)), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def converted_dirs(hf_dir, text_file, tmp_path_factory):
    """Run ``convert`` once with everything on; returns (rc, stdout, stderr, output, report)."""
    root = tmp_path_factory.mktemp("cli")
    out, rep = root / "saved", root / "report"
    argv = [
        "convert",
        str(hf_dir),
        "--tile",
        "16",
        "--budget",
        "0.3",
        "--calibration",
        str(text_file),
        "--calibration-tokens",
        "200",
        "--output",
        str(out),
        "--report",
        str(rep),
        "--heads",
        "0",
        "1",
    ]
    cap = _Capture()
    with cap:
        rc = cli.main(argv)
    return rc, cap.out, cap.err, out, rep


class _Capture:
    """capsys is function-scoped; this captures a module-scoped fixture's output."""

    def __enter__(self):
        import io

        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._old


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *words):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanite-compile: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_help_on_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out
    for cmd, words in {
        "convert": [
            "--budget",
            "--tile",
            "--calibration",
            "--calibration-tokens",
            "--output",
            "--report",
            ".gguf",
        ],
        "report": ["DIR", "--json"],
        "eval": ["--tokens", "--budget", "--range-size", "TEXT"],
        "bench": ["benchmarks/speed.py"],
    }.items():
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for w in words:
            assert w in out, (cmd, w)


@pytest.mark.parametrize("flags, expected", [
    ([], True), (["--no-plan-check"], False), (["--plan-check"], True),
])
def test_bool_config_flags(flags, expected):
    """Boolean NaniteConfig options get --x / --no-x flags; left out, the config default holds."""
    parser = cli.build_parser()
    args = parser.parse_args(["convert", "model.gguf", "--tile", "16", *flags])
    cfg = cli._config(args)
    assert cfg.plan_check is expected and cfg.tile == 16


def test_max_level_flag():
    """--max-level sets NaniteConfig.max_level; left out, the default (pairs) holds."""
    parser = cli.build_parser()
    cfg = cli._config(parser.parse_args(["convert", "model.gguf", "--max-level", "3"]))
    assert cfg.max_level == 3
    assert cli._config(parser.parse_args(["convert", "model.gguf"])).max_level == 1


def test_select_flag():
    """--select query sets NaniteConfig.select; anything else is refused by argparse."""
    parser = cli.build_parser()
    assert cli._config(parser.parse_args(["convert", "model.gguf", "--select", "query"])).select \
        == "query"
    assert cli._config(parser.parse_args(["convert", "model.gguf"])).select == "row"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "model.gguf", "--select", "token"])


def test_row_tiles_flag():
    """--row-tiles 2 sets NaniteConfig.row_tiles; values other than 1 and 2 are refused."""
    parser = cli.build_parser()
    assert cli._config(parser.parse_args(["convert", "m.gguf", "--row-tiles", "2"])).row_tiles == 2
    assert cli._config(parser.parse_args(["convert", "m.gguf"])).row_tiles == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "m.gguf", "--row-tiles", "3"])


def test_convert_saves_and_reports(converted_dirs):
    rc, out, err, saved, rep = converted_dirs
    assert rc == 0, err
    assert "model.layers.0.self_attn" in out and "rewritten" in out
    assert (saved / "nanite.json").is_file() and (saved / "nanite.safetensors").is_file()
    header = json.loads((saved / "nanite.json").read_text())
    assert header["config"]["tile"] == 16 and header["config"]["budget"] == 0.3
    # the calibration text, not the synthetic probe, measured the sites: 200 tokens
    assert header["report"]["sites"][0]["measured_shape"][2] == 200
    assert (rep / "report.html").is_file() and (rep / "levels.png").is_file()
    assert "report.html" in out


def test_report_prints_the_saved_table(converted_dirs, capsys, tmp_path):
    saved = converted_dirs[3]
    rc, out, err = run(capsys, "report", saved)
    assert rc == 0, err
    assert "model.layers.1.self_attn" in out and "2 rewritten" in out
    rc, out, _ = run(capsys, "report", saved, "--json")
    assert rc == 0 and len(json.loads(out)["sites"]) == 2
    rc, out, _ = run(capsys, "report", converted_dirs[4], "--html", tmp_path / "html")
    assert rc == 0 and "2 rewritten" in out and (tmp_path / "html" / "report.html").is_file()


def test_eval_before_and_after(converted_dirs, hf_dir, text_file, capsys, tmp_path):
    saved = converted_dirs[3]
    rc, out, err = run(
        capsys,
        "eval",
        hf_dir,
        text_file,
        "--tokens",
        256,
        "--range-size",
        128,
        "--nanite",
        saved,
        "--json",
        tmp_path / "eval.json",
        "--quiet",
    )
    assert rc == 0, err
    assert "tokens 0-128" in out and "tokens 128-256" in out and "budget 0.3" in out
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["tokens"] == 256 and [r["end"] for r in res["after"]["ranges"]] == [128, 256]
    assert res["before"]["ppl"] > 1 and res["after"]["ppl"] > 1


def test_eval_in_chunks(converted_dirs, hf_dir, text_file, capsys, tmp_path):
    """--chunk scores both models in pieces that continue the KV cache: the original's
    perplexity is its one-pass perplexity to fp32 rounding; a chunk as long as the text
    is one pass, and said to be."""
    args = ["eval", hf_dir, text_file, "--tokens", 256, "--nanite", converted_dirs[3],
            "--quiet", "--json"]
    rc, _, err = run(capsys, *args, tmp_path / "whole.json")
    assert rc == 0, err
    rc, out, err = run(capsys, *args, tmp_path / "chunked.json", "--chunk", 100)
    assert rc == 0, err
    assert "in chunks of 100 tokens" in out
    whole = json.loads((tmp_path / "whole.json").read_text())
    chunked = json.loads((tmp_path / "chunked.json").read_text())
    assert chunked["chunk"] == 100 and whole["chunk"] is None
    assert chunked["before"]["nll"] == pytest.approx(whole["before"]["nll"], rel=1e-5)
    assert chunked["after"]["ppl"] > 1
    rc, out, err = run(capsys, *args, tmp_path / "long.json", "--chunk", 256)
    assert rc == 0, err
    assert "on the KV cache" not in out and json.loads((tmp_path / "long.json").read_text())["chunk"] is None
    rc, _, err = run(capsys, "eval", hf_dir, text_file, "--chunk", 0)
    assert_one_line_error(rc, err, "--chunk must be at least 1")


def test_errors_are_one_line(hf_dir, text_file, converted_dirs, capsys, tmp_path):
    rc, _, err = run(capsys, "convert", tmp_path / "nowhere")
    assert_one_line_error(rc, err, "not found", ".gguf")
    rc, _, err = run(capsys, "convert", text_file)
    assert_one_line_error(rc, err, "not a .gguf file")
    rc, _, err = run(capsys, "convert", hf_dir, "--budget", "2")
    assert_one_line_error(rc, err, "budget must be in (0, 1]")
    rc, _, err = run(capsys, "convert", hf_dir, "--tile", "24")
    assert_one_line_error(rc, err, "power of two")
    rc, _, err = run(capsys, "convert", hf_dir, "--calibration", tmp_path / "missing.txt")
    assert_one_line_error(rc, err, "no such file")
    rc, _, err = run(capsys, "report", tmp_path)
    assert_one_line_error(rc, err, "convert MODEL --output")
    rc, _, err = run(capsys, "eval", hf_dir, text_file, "--tokens", 5000, "--quiet")
    assert_one_line_error(rc, err, "fewer than --tokens 5000")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in converted_dirs[3].iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "nanite.json").write_text((damaged / "nanite.json").read_text()[:100])
    rc, _, err = run(capsys, "report", damaged)
    assert_one_line_error(rc, err, "truncated", "nanite_compile.save")
    rc, _, err = run(capsys, "eval", hf_dir, text_file, "--nanite", damaged)
    assert_one_line_error(rc, err, "truncated")
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors also exit 2
        cli.main(["convert"])
    assert e.value.code == 2


def test_bench_runs_the_speed_script(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--", "--help"])
    assert e.value.code == 0
    assert "--lengths" in capsys.readouterr().out
    monkeypatch.setattr(cli, "_benchmark_script", lambda name: None)
    rc, _, err = run(capsys, "bench")
    assert_one_line_error(rc, err, "benchmarks/speed.py", "source checkout")


def test_eval_offers_no_calibration_only_options(capsys):
    """eval converts without calibration: --max-error, --objective, --plan-tokens and
    --plan-check were listed there and did nothing; now argparse refuses them."""
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--budget" in out and "with --calibration" not in out
    for flag in ("--max-error", "--objective", "--plan-tokens", "--plan-check"):
        assert flag not in out, flag
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "model.gguf", "text.txt", flag, "1"])
        assert e.value.code == 2, flag
        assert "unrecognized arguments" in capsys.readouterr().err


def test_report_pictures_with_bad_heads_are_one_line_errors(hf_dir, capsys, tmp_path):
    rc, _, err = run(capsys, "convert", hf_dir, "--report", tmp_path / "r", "--heads", "-3", "-q")
    assert_one_line_error(rc, err, "KV head indices")
    rc, out, err = run(capsys, "convert", hf_dir, "--report", tmp_path / "r0", "--report-sites",
                       "0", "-q")
    assert rc == 0, err
    assert (tmp_path / "r0" / "report.html").exists()


def test_console_script_help():
    script = Path(sys.executable).parent / "nanite-compile"
    if not script.exists():
        pytest.skip(f"{script} is missing: run bash scripts/setup.sh (pip install -e .)")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert cmd in res.stdout


def test_bench_keeps_a_fixed_number_of_reads(capsys):
    """``--budget-reads`` rows keep the key reads per query fixed as N grows, so their
    share of the causal reads halves when N doubles (the linear-cost setting)."""
    rc = cli.main(["bench", "--", "--lengths", "1024", "2048", "--budgets", "--budget-reads",
                   "256", "--repeat", "1", "--heads", "4", "--kv-heads", "2"])
    out = capsys.readouterr().out
    assert rc in (0, None), out
    rows = [r for r in out.splitlines() if "256 reads" in r and r.split("|")[1].strip().isdigit()]
    assert len(rows) == 2, out
    share = [float(r.split("|")[6]) for r in rows]  # reads/orig at 1024 and 2048 tokens
    assert 0.4 < share[1] / share[0] < 0.6, share
    assert "tiled, budget 256 reads" in out


def test_objective_flag():
    """--objective picks what calibration plans by; a wrong one is refused by argparse."""
    parser = cli.build_parser()
    assert cli._config(parser.parse_args(["convert", "m.gguf"])).objective == "model"
    args = parser.parse_args(["convert", "m.gguf", "--objective", "site"])
    assert cli._config(args).objective == "site"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "m.gguf", "--objective", "kl"])
