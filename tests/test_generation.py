"""Generation with the bounded cache (issue 5, "Generation").

* decode == prefill: token-by-token decoding with a `NaniteLayer` gives, for
  the last query of each step, the output of the reference op on the whole
  sequence with the schedule's static level table (fp64, to rounding), with
  left padding, anchors, pooled tiles moving down the levels and the state;
* the cache is bounded: its size at two context lengths is the same once
  past the horizon, and well under the full KV cache;
* on a tiny random Llama: budget 1.0 greedy tokens equal the original's (also
  a left-padded batch); at 0.25 greedy and sampling run with finite logits;
  bad arguments raise clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch

import nanite_compile
from nanite_compile import NaniteConfig
from nanite_compile.generation import (
    NaniteCache,
    NaniteLayer,
    make_schedule,
    static_levels,
)
from nanite_compile.kernels.decode import decode_attention
from nanite_compile.kernels.levels import EXACT, NONE, STATE, TileParams
from nanite_compile.kernels.reference import random_features, tiled_attention_from_levels

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402  (after the importorskip)

F64_TOL = 1e-10


def _params(**kw) -> TileParams:
    base = dict(tile=8, window=2, anchors=1, horizon=None, budget=0.25, budget_reads=None,
                state_features=16)
    base.update(kw)
    return TileParams(**base)


# ------------------------------------------------------------------ schedule


def test_schedule_levels_coarsen_with_age_and_meet_budget():
    p = _params(tile=64, state_features=64)
    sc = make_schedule(p, 8192)
    assert list(sc.band) == sorted(sc.band), "a tile only coarsens as it ages"
    reads = (sc.window + sc.anchors) * 64 + sum(64 >> lv for lv in sc.band)
    assert reads <= 0.25 * 8192
    lv = static_levels(sc, 8192)
    upper = torch.ones_like(lv, dtype=torch.bool).triu(1)
    assert (lv.diagonal() == EXACT).all() and (lv[:, 0] == EXACT).all()
    assert (lv[upper] == NONE).all() and (lv[~upper] != NONE).all()


def test_schedule_state_past_horizon():
    sc = make_schedule(_params(horizon=3), 200)
    assert sc.horizon == 3
    lv = static_levels(sc, 200)
    assert (lv == STATE).any()
    # every row: STATE tiles are a prefix after the anchors (the state is a prefix sum)
    for row in lv:
        st = (row == STATE).nonzero().flatten().tolist()
        assert st == list(range(1, 1 + len(st)))


def test_budget_one_is_exact_everywhere():
    sc = make_schedule(_params(budget=1.0), 500)
    assert sc.exact
    lv = static_levels(sc, 100)
    assert set(lv.unique().tolist()) <= {EXACT, NONE}


# ------------------------------------------------------------------ decode == prefill


def _run_decode_vs_reference(params: TileParams, n_prompt: int, n_total: int, pad: int = 0,
                             context: int = 120):
    torch.manual_seed(0)
    b, h, hkv, d = 2, 4, 2, 16
    T = params.tile
    scale = d ** -0.5
    k = torch.randn(b, hkv, n_total, d, dtype=torch.float64)
    v = torch.randn(b, hkv, n_total, d, dtype=torch.float64)
    q = torch.randn(b, h, n_total, d, dtype=torch.float64)
    # a few tiles of near-duplicate keys, and one tile of strong keys
    k[:, :, 2 * T:3 * T] = k[:, :, 2 * T:2 * T + 1] + 0.01 * k[:, :, 2 * T:3 * T]
    k[:, :, 4 * T:5 * T] *= 3.0
    valid = torch.ones(b, n_total, dtype=torch.bool)
    valid[1, :pad] = False  # left padding of the second row
    sc = make_schedule(params, context)
    layer = NaniteLayer(sc, seed=0, scale=scale)
    proj = random_features(d, params.state_features, hkv, 0, "cpu", torch.float64)
    layer.update(k[:, :, :n_prompt], v[:, :, :n_prompt], valid[:, :n_prompt])
    worst = 0.0
    kinds = set()
    for t in range(n_prompt, n_total):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1], valid[:, t:t + 1])
        got = decode_attention(q[:, :, t:t + 1], layer.entry, scale)
        lv = static_levels(sc, t + 1, n_query=1)
        kinds |= set(lv.unique().tolist())
        ref = tiled_attention_from_levels(
            q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
            lv[None, None].expand(b, hkv, -1, -1), scale=scale, causal=True, tile=T,
            key_valid=valid[:, :t + 1], feature_proj=proj,
        )
        worst = max(worst, float((got - ref).abs().max()))
    return worst, kinds, layer


@pytest.mark.parametrize("n_prompt", [1, 37])
def test_decode_equals_static_prefill(n_prompt):
    params = _params(horizon=4)
    worst, kinds, layer = _run_decode_vs_reference(params, n_prompt, 150, pad=11)
    assert worst < F64_TOL, worst
    # the run went through every kind of level: exact, pooled, coarsest, state
    assert {EXACT, STATE} <= kinds and any(x > 0 for x in kinds), kinds
    assert layer.state is not None


def test_decode_equals_static_prefill_without_state():
    params = _params(state_features=0, horizon=3)
    worst, kinds, _ = _run_decode_vs_reference(params, 20, 110)
    assert worst < F64_TOL, worst
    assert STATE not in kinds


def test_decode_equals_static_prefill_budget_reads():
    params = _params(budget_reads=40, anchors=2)
    worst, kinds, _ = _run_decode_vs_reference(params, 30, 140, pad=3)
    assert worst < F64_TOL, worst


def test_cache_size_grows_with_horizon_not_context():
    sc = make_schedule(_params(tile=16, horizon=4, state_features=16), 256)
    layer_sizes = []
    for n in (592, 1200):  # both whole tiles: same near-field phase
        layer = NaniteLayer(sc, seed=0, scale=0.25)
        k = torch.randn(1, 2, n, 16)
        layer.update(k, k, torch.ones(1, n, dtype=torch.bool))
        layer_sizes.append((layer.keys.shape[2], layer.nbytes()))
    # same tile phase (both multiples of 16 tokens... up to the near field): same size
    assert layer_sizes[0] == layer_sizes[1]
    full = 1200 * 2 * 16 * 2 * 4
    assert layer_sizes[1][1] < 0.3 * full
    # a longer horizon holds more
    sc2 = make_schedule(_params(tile=16, horizon=12, state_features=16), 256)
    layer = NaniteLayer(sc2, seed=0, scale=0.25)
    k = torch.randn(1, 2, 1200, 16)
    layer.update(k, k, torch.ones(1, 1200, dtype=torch.bool))
    assert layer.nbytes() > layer_sizes[1][1]


# ------------------------------------------------------------------ a tiny Llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(hidden=64, max_pos=512, impl="sdpa")


@pytest.fixture(scope="module")
def converted(llama):
    calib = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    return {
        # a near field of 2 tiles and 1 anchor: a 64-token bounded cache still compresses
        b: nanite_compile.convert(llama, config=NaniteConfig(budget=b, tile=16, window=2, anchors=1),
                                  calibration=calib)
        for b in (1.0, 0.25)
    }


def _prompt(b=1, n=70, seed=2):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def test_budget_one_greedy_identical(llama, converted):
    ids = _prompt()
    ref = llama.generate(ids, max_new_tokens=30, do_sample=False)
    cache = NaniteCache(converted[1.0])
    out = converted[1.0].generate(ids, cache=cache, max_new_tokens=30, do_sample=False)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + 29


def test_budget_one_greedy_identical_left_padded_batch(llama, converted):
    ids = _prompt(b=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    ids[1, :13] = 0
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = nanite_compile.generate(converted[1.0], ids, attention_mask=mask, max_new_tokens=20,
                                  do_sample=False)
    assert torch.equal(out, ref)


def test_one_token_prompt(llama, converted):
    """A prompt of one token (a BOS alone) is one new token too: the cache returned its
    compressed entries where the traced op expected the decode placeholder's length."""
    ids = _prompt(b=2, n=1)
    ref = llama.generate(ids, max_new_tokens=25, do_sample=False)
    assert torch.equal(nanite_compile.generate(converted[1.0], ids, max_new_tokens=25,
                                               do_sample=False), ref)
    cache = NaniteCache(converted[0.25], context=128)
    out = converted[0.25].generate(ids, cache=cache, max_new_tokens=90, min_new_tokens=90,
                                   do_sample=False)
    assert out.shape == (2, 91)
    for layer in cache.layers:  # past the near field and anchors: it compressed
        assert layer.keys.shape[2] == layer.schedule.compressed_length(90) < 90


def test_bounded_greedy_and_sampling_run(converted):
    model = converted[0.25]
    ids = _prompt(b=2, n=90)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    cache = NaniteCache(model, context=128)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=60,
                         min_new_tokens=60, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 150)
    assert all(torch.isfinite(lg).all() for lg in out.logits)
    # bounded: fewer entries than tokens, and the state took the oldest tiles
    for layer in cache.layers:
        assert layer.keys.shape[2] == layer.schedule.compressed_length(149) < 149
        assert layer.state is not None
    torch.manual_seed(0)
    samp = nanite_compile.generate(model, ids, attention_mask=mask, max_new_tokens=20,
                                   do_sample=True, top_k=20, output_logits=True,
                                   return_dict_in_generate=True)
    assert all(torch.isfinite(lg).all() for lg in samp.logits)


def test_the_op_takes_the_decode_path_in_the_model(converted, monkeypatch):
    """In the converted model the op finds the cache's tensors and runs the bounded decode."""
    from nanite_compile.kernels import decode

    calls = []
    real = decode.decode_attention

    def spy(q, kv, scale):
        calls.append(kv.keys.shape[2])
        return real(q, kv, scale)

    monkeypatch.setattr(decode, "decode_attention", spy)
    model = converted[0.25]
    ids = _prompt(n=70)
    cache = NaniteCache(model, context=64)
    model.generate(ids, cache=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == 2 * 4, calls  # 2 layers x 4 decode steps
    assert calls[-1] == cache.layers[1].keys.shape[2] < 74


def test_bad_arguments(llama, converted):
    with pytest.raises(ValueError, match="not converted"):
        NaniteCache(llama)
    with pytest.raises(TypeError, match="nn.Module"):
        NaniteCache("model")
    with pytest.raises(ValueError, match="context"):
        NaniteCache(converted[0.25], context=0)
    with pytest.raises(ValueError, match="context"):
        make_schedule(_params(), -5)
    with pytest.raises(ValueError, match="input_ids"):
        nanite_compile.generate(converted[0.25], [1, 2, 3])
    with pytest.raises(ValueError, match="own NaniteCache"):
        nanite_compile.generate(converted[0.25], _prompt(), cache=None)
    cache = NaniteCache(converted[0.25], context=64)
    model = converted[0.25]
    ids = _prompt(n=40)
    model(ids, cache=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="one token per step"):
        model(ids[:, :3], cache=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(-1)


def test_state_scale_mismatch_is_an_error():
    sc = make_schedule(_params(horizon=1), 64)
    layer = NaniteLayer(sc, seed=0, scale=0.25)
    k = torch.randn(1, 2, 80, 16)
    layer.update(k, k, torch.ones(1, 80, dtype=torch.bool))
    assert layer.state is not None
    with pytest.raises(ValueError, match="scale"):
        decode_attention(torch.randn(1, 4, 1, 16), layer.entry, scale=1.0)
    assert math.isfinite(float(decode_attention(torch.randn(1, 4, 1, 16), layer.entry, 0.25).sum()))


def _mistral(window):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=window)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_a_sliding_window_the_cache_cannot_follow_is_refused():
    """The bounded cache keeps summaries of old tiles, which a sliding window must not
    see: decoding a Mistral of window 40 through it gave wrong logits from the second
    step on. Below budget 1.0 it is refused past the window and allowed within it; at
    budget 1.0 the cache is the full one and the model's mask applies the window."""
    model = _mistral(40)
    conv = nanite_compile.convert(model, config=NaniteConfig(budget=0.25, tile=16))
    with pytest.raises(ValueError, match=r"sliding-window attention \(sliding_window=40"):
        NaniteCache(conv)
    with pytest.raises(ValueError, match=r"context is 41 tokens.*context <= 40"):
        nanite_compile.generate(conv, _prompt(n=31), max_new_tokens=10)
    ids = _prompt(n=30)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(nanite_compile.generate(conv, ids, max_new_tokens=10, do_sample=False), ref)
    exact = nanite_compile.convert(model, config=NaniteConfig(budget=1.0, tile=16))
    long = _prompt(n=60)
    assert torch.equal(nanite_compile.generate(exact, long, max_new_tokens=10, do_sample=False),
                       model.generate(long, max_new_tokens=10, do_sample=False))


def test_many_call_variants_keep_the_tiled_path():
    """Each generate() variant (beams, a static cache, no cache, returned attentions, batch
    1 or 2) is a compiled variant of every site; past Dynamo's default limit of 8 a new
    one ran the original attention, silently. Sites keep up to 64."""
    from nanite_compile.kernels.ops import recording

    model = tiny_llama(max_pos=512, impl="sdpa")
    model.generation_config.pad_token_id = 0
    conv = nanite_compile.convert(model, budget=0.25)
    ids = _prompt(b=2, n=300)
    for kw in [{}, dict(num_beams=3), dict(cache_implementation="static"), dict(use_cache=False),
               dict(output_attentions=True, return_dict_in_generate=True)]:
        conv.generate(ids, max_new_tokens=3, **kw)
    with recording() as rec:
        conv.generate(ids[:1], max_new_tokens=3)
    assert sorted(rec) == sorted(s.site for s in nanite_compile.report(conv).sites), rec
    for recs in rec.values():  # each site's prefill ran the tiled op
        assert [r["path"] for r in recs if r["q_shape"][2] > 1] == ["tiled"], recs


def test_static_cache_runs_tiled_where_the_tokens_are():
    """Hugging Face's StaticCache hands the attention all its slots, the empty ones
    masked: a prompt and a chunk after it run tiled on the filled slots (the near field
    where the tokens are), and give what a DynamicCache gives."""
    from transformers import StaticCache

    from nanite_compile.kernels.ops import recording

    model = tiny_llama(impl="sdpa", max_pos=1024)
    conv = nanite_compile.convert(model, config=NaniteConfig(budget=0.25, tile=16))
    ids = torch.randint(1, 128, (1, 400), generator=torch.Generator().manual_seed(3))

    def run(cache):
        with torch.no_grad():
            first = conv(ids[:, :203], cache=cache, use_cache=True)
            cache = cache if cache is not None else first.cache
            second = conv(ids[:, 203:], cache=cache, use_cache=True)
        return torch.cat([first.logits, second.logits], 1)

    with recording() as rec:
        static = run(StaticCache(config=model.config, max_cache_len=512))
    calls = [r for recs in rec.values() for r in recs]
    assert (197, 512) in {(r["q_shape"][2], r["k_shape"][2]) for r in calls}  # the chunk
    assert all(r["path"] == "tiled" and r["mask"] == "causal" for r in calls), calls
    torch.testing.assert_close(static, run(None), rtol=1e-5, atol=1e-5)
