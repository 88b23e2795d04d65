"""nanite_compile.evaluate on a tiny random Llama: the numbers match an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from nanite_compile.evaluate import (
    PerplexityResult,
    logits_of,
    perplexity,
    time_forward,
    time_forwards,
    token_nll,
)

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402  (after the importorskip)

N = 48
VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, max_pos=128)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(1))


def reference_nll(model, ids) -> torch.Tensor:
    """Per-token NLL in float64, written out independently of evaluate.py."""
    with torch.no_grad():
        logits = model(ids).logits.double()
    logp = logits[:, :-1] - torch.logsumexp(logits[:, :-1], dim=-1, keepdim=True)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_ppl_is_exp_mean_nll(model, ids):
    ref = reference_nll(model, ids)
    res = perplexity(model, ids)
    assert isinstance(res, PerplexityResult)
    assert res.n_tokens == 2 * (N - 1)
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(ref.mean().item()), rel=1e-6)
    # A random model is close to uniform over the vocabulary.
    assert VOCAB / 2 < res.ppl < VOCAB * 2


def test_one_dim_input_is_one_sequence(model, ids):
    assert perplexity(model, ids[0]).ppl == pytest.approx(perplexity(model, ids[:1]).ppl, rel=1e-9)


def test_int32_token_ids(model, ids):
    assert perplexity(model, ids.int()).nll == pytest.approx(perplexity(model, ids).nll, rel=1e-9)


def test_ranges_partition_the_tokens(model, ids):
    ref = reference_nll(model, ids)
    res = perplexity(model, ids, ranges=[(0, 16), (16, 40), (40, N)])
    # Position 0 is never predicted, so the first range scores tokens 1..15.
    assert [r.n_tokens for r in res.ranges] == [2 * 15, 2 * 24, 2 * 8]
    assert sum(r.n_tokens for r in res.ranges) == res.n_tokens
    for r, (lo, hi) in zip(res.ranges, [(1, 16), (16, 40), (40, N)], strict=True):
        assert r.nll == pytest.approx(ref[:, lo - 1 : hi - 1].mean().item(), rel=1e-6)
        assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-12)
    weighted = sum(r.nll * r.n_tokens for r in res.ranges) / res.n_tokens
    assert weighted == pytest.approx(res.nll, rel=1e-9)


def test_ranges_may_overlap_and_keep_their_order(model, ids):
    res = perplexity(model, ids, ranges=[(10, 20), (0, N), (5, 15)])
    assert [(r.start, r.end) for r in res.ranges] == [(10, 20), (0, N), (5, 15)]
    assert res.ranges[1].nll == pytest.approx(res.nll, rel=1e-9)


@pytest.mark.parametrize(
    "ranges, error, match",
    [
        ([(0, N + 1)], ValueError, "0 <= start < end <= 48"),
        ([(-1, 4)], ValueError, "0 <= start < end"),
        ([(8, 8)], ValueError, "0 <= start < end"),
        ([(9, 3)], ValueError, "0 <= start < end"),
        ([(0, 1)], ValueError, "predicts no token"),
        ([(0, 4.0)], TypeError, "pair of ints"),
        ([(0, 4, 8)], TypeError, "pair of ints"),
        ([5], TypeError, "pair of ints"),
    ],
)
def test_bad_ranges_raise(model, ids, ranges, error, match):
    with pytest.raises(error, match=match):
        perplexity(model, ids, ranges=ranges)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(2, N), TypeError, "integer token ids"),
        (torch.zeros(1, 2, N, dtype=torch.long), ValueError, r"\[N\] or \[B, N\]"),
        (torch.zeros(1, 1, dtype=torch.long), ValueError, "at least 2 tokens"),
        ([1, 2, 3], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_ids_raise(model, bad, error, match):
    with pytest.raises(error, match=match):
        perplexity(model, bad)


def test_plain_module_returning_logits_tensor():
    """A non-HF model whose forward returns the logits tensor itself."""
    emb = torch.nn.Embedding(VOCAB, VOCAB)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(emb(ids)[0, :-1], ids[0, 1:])
    assert perplexity(emb, ids).nll == pytest.approx(ref.item(), rel=1e-6)


def test_output_without_logits_is_a_clear_error():
    class NoLogits(torch.nn.Module):
        def forward(self, ids):
            return {"hidden": ids}

    with pytest.raises(TypeError, match="expected a logits tensor"):
        logits_of(NoLogits(), torch.zeros(1, 4, dtype=torch.long))


def test_uninformative_logits_give_vocabulary_size():
    logits = torch.zeros(1, 5, VOCAB)
    ids = torch.arange(5)[None]
    assert (
        token_nll(logits, ids).exp().allclose(torch.full((1, 4), float(VOCAB), dtype=torch.float64))
    )


def test_chunked_nll_equals_unchunked():
    logits = torch.randn(2, 33, VOCAB, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(4))
    assert torch.equal(token_nll(logits, ids, chunk=5), token_nll(logits, ids, chunk=10_000))


def test_scoring_in_chunks_continues_the_cache(model, ids):
    """Pieces of 20 tokens (20, 20, 8), each run against the KV cache of the ones before,
    give the one-pass logits of the original model to fp32 rounding; a chunk as long as
    the input is one pass."""
    whole = logits_of(model, ids)
    chunked = logits_of(model, ids, chunk=20)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    assert perplexity(model, ids, chunk=20).nll == pytest.approx(perplexity(model, ids).nll,
                                                                 rel=1e-5)
    assert torch.equal(logits_of(model, ids, chunk=N), whole)


def test_converted_model_scores_in_chunks():
    """A converted model scored in chunks runs the tiled op on every chunk after the first
    (the continuation of its cache), and depends on no later token."""
    import nanite_compile
    from nanite_compile.kernels.ops import recording

    conv = nanite_compile.convert(tiny_llama(vocab=VOCAB, max_pos=512),
                                  config=nanite_compile.NaniteConfig(budget=0.25, tile=16))
    ids = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(5))
    with recording() as rec:
        res = perplexity(conv, ids, ranges=[(100, 300)], chunk=100)
    calls = [r for recs in rec.values() for r in recs]
    assert [r["q_shape"][2] for r in calls].count(100) == len(calls) == 2 * 3
    assert all(r["path"] == "tiled" for r in calls if r["k_shape"][2] > 100), calls
    assert math.isfinite(res.ppl) and res.ranges[0].n_tokens == 200
    changed = ids.clone()
    changed[:, 250:] = (changed[:, 250:] + 1) % VOCAB
    a, b = logits_of(conv, ids, chunk=100), logits_of(conv, changed, chunk=100)
    torch.testing.assert_close(a[:, :250], b[:, :250], rtol=1e-5, atol=1e-5)


def test_compiled_model_scores_in_chunks():
    """A ``torch.compile`` wrapper (forward ``*args, **kwargs``) is asked about the module
    it compiled: it takes a cache, so it scores in chunks."""
    import nanite_compile  # noqa: F401  (registers the backend)

    m = tiny_llama(vocab=VOCAB, max_pos=512)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(6))
    comp = torch.compile(m, backend="nanite", options={"budget": 0.25, "tile": 16})
    whole = perplexity(comp, ids).nll
    assert perplexity(comp, ids, chunk=64).nll == pytest.approx(whole, rel=0.05)


@pytest.mark.parametrize("chunk, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                          (True, TypeError), ("8", TypeError)])
def test_bad_chunk_raises(model, ids, chunk, error):
    with pytest.raises(error, match="chunk must be"):
        perplexity(model, ids, chunk=chunk)


def test_chunks_need_a_model_with_a_cache():
    emb = torch.nn.Embedding(VOCAB, VOCAB)
    with pytest.raises(TypeError, match="takes and returns a KV cache.*one pass"):
        logits_of(emb, torch.zeros(1, 10, dtype=torch.long), chunk=4)


def test_infinite_nll_gives_infinite_ppl():
    class Certain(torch.nn.Module):
        def forward(self, ids):
            logits = torch.full((*ids.shape, VOCAB), -1e30)
            logits[..., 0] = 0.0  # always predicts token 0
            return logits

    res = perplexity(Certain(), torch.ones(1, 4, dtype=torch.long))
    assert res.ppl == math.inf and res.nll > 1e29


def test_time_forward(model, ids):
    t = time_forward(model, ids, repeat=3, warmup=1)
    assert len(t.times_s) == 3 and all(x > 0 for x in t.times_s)
    assert t.min_s <= t.median_s
    assert set(t.to_dict()) == {"median_s", "min_s", "times_s"}


def test_time_forwards_alternates_models(ids):
    calls = []

    class Logged(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return torch.zeros(*x.shape, VOCAB)

    t = time_forwards({"a": Logged("a"), "b": Logged("b")}, ids, repeat=2, warmup=1)
    assert calls == ["a", "b"] * 3  # one warm-up round, then two timed rounds
    assert list(t) == ["a", "b"] and all(len(x.times_s) == 2 for x in t.values())


def test_time_forwards_needs_a_model(ids):
    with pytest.raises(ValueError, match="at least one model"):
        time_forwards({}, ids)


@pytest.mark.parametrize("kw", [{"repeat": 0}, {"repeat": 1.5}, {"warmup": -1}])
def test_time_forward_bad_arguments(model, ids, kw):
    with pytest.raises(ValueError, match="repeat|warmup"):
        time_forward(model, ids, **kw)


def test_no_grad_and_no_cache(model, ids):
    logits = logits_of(model, ids)
    assert not logits.requires_grad
    assert logits.shape == (2, N, VOCAB)
