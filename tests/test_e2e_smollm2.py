"""The real model end to end: SmolLM2-135M from its GGUF file, converted with no hand edits.

Needs the GGUF that ``scripts/fetch_assets.sh`` extracts (``.ci/run`` fetches
it first); without it every test here is skipped with a reason naming the
script. The model is loaded once per module.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import nanite_compile
from nanite_compile import data
from nanite_compile.evaluate import logits_of, token_nll

N_PPL = 2048  # the reference perplexity is on the first 2048 GPL-3 tokens
N_EXACT = 600  # budget-1.0 logits comparison: 9 full tiles of 64 and a partial one
REFERENCE_PPL = 19.66  # the original model, first 2048 GPL-3 tokens, no BOS
N_LAYERS = 30


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(token_nll(logits, ids).mean().item())


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = data.load_smollm2()
    except data.AssetMissingError as e:
        pytest.skip(f"SmolLM2 GGUF not fetched: run `bash scripts/fetch_assets.sh` ({e})")
    ids = data.token_ids(tokenizer, data.gpl3_text(), N_PPL)
    return model, ids, logits_of(model, ids)


def test_original_perplexity_matches_reference(smollm2):
    model, ids, logits = smollm2
    assert _ppl(logits, ids) == pytest.approx(REFERENCE_PPL, abs=0.05)


def test_budget_one_reproduces_the_logits(smollm2):
    """At budget 1.0 every tile is EXACT, so the converted model is the original up to
    float32 rounding. The allowed error is derived, not tuned: an fp64 run of the
    original is the golden output, and the converted model's error against it must
    stay within a small factor of the original float32 model's own error against it."""
    model, ids, _ = smollm2
    ids = ids[:, :N_EXACT]
    converted = nanite_compile.convert(model, budget=1.0)
    assert type(converted) is type(model)
    rep = nanite_compile.report(converted)
    assert len(rep.sites) == N_LAYERS
    assert all(s.status == "rewritten" for s in rep.sites), str(rep)

    golden = logits_of(copy.deepcopy(model).double(), ids)
    ref_err = (logits_of(model, ids).double() - golden).abs().max().item()
    conv_err = (logits_of(converted, ids).double() - golden).abs().max().item()
    scale = golden.abs().max().item()
    assert 0 < ref_err < 1e-3 * scale  # float32 rounding, far below the logits' scale
    assert conv_err <= 4 * ref_err, (
        f"budget 1.0: max |converted - fp64| = {conv_err:.3g} against "
        f"max |original fp32 - fp64| = {ref_err:.3g} (logits up to {scale:.3g})"
    )


def test_budget_quarter_is_sane(smollm2):
    model, ids, logits = smollm2
    short_before = logits_of(model, ids[:, :256])
    converted = nanite_compile.convert(model, budget=0.25)
    rep = nanite_compile.report(converted)
    assert len(rep.sites) == N_LAYERS, str(rep)
    assert [s.status for s in rep.sites] == ["rewritten"] * N_LAYERS, str(rep)

    original = _ppl(logits, ids)
    ppl = _ppl(logits_of(converted, ids), ids)
    assert math.isfinite(ppl)
    assert ppl <= 1.5 * original, f"budget 0.25: ppl {ppl:.3f} against {original:.3f}"
    # converting leaves the model passed in as it was
    assert torch.equal(logits_of(model, ids[:, :256]), short_before)
