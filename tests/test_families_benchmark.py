"""benchmarks/families.py: the family table a user reads before trying a model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tabulate")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "families.py"


def _load():
    spec = importlib.util.spec_from_file_location("families_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_say_what_was_rewritten_and_why_not(tmp_path, capsys):
    fam = _load()
    out = tmp_path / "rows.json"
    assert fam.main(["--families", "Llama", "XGLM", "NoSuchFamily", "--json", str(out)]) == 0
    rows = {r["family"]: r for r in json.loads(out.read_text())}
    llama, xglm = rows["Llama"], rows["XGLM"]
    assert (llama["status"], llama["sites"], llama["rewritten"]) == ("ok", 2, 2)
    assert llama["max_diff_budget_1"] == 0.0 and llama["finite_budget_0.25"]
    assert (xglm["status"], xglm["sites"], xglm["rewritten"]) == ("ok", 2, 0)
    assert any("torch.max between the scores and the softmax" in r for r in xglm["skipped"])
    assert rows["NoSuchFamily"]["status"] == "not built"
    text = capsys.readouterr().out
    assert "| Llama" in text and "2 of 2 families converted and ran; 1 not built" in text


def test_encoders_are_compared_on_their_real_positions(tmp_path):
    """An encoder runs on a padded batch; the budget-1.0 difference is taken where tokens are
    real (padding rows are free to differ) and the row says so by its kind."""
    fam = _load()
    out = tmp_path / "rows.json"
    assert fam.main(["--encoders", "Bert", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["family"], row["kind"], row["status"]) == ("Bert", "encoder", "ok")
    assert row["rewritten"] == row["sites"] == 2
    assert row["max_diff_budget_1"] < 1e-5 and row["finite_budget_0.25"]
