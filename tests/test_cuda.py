"""A converted Hugging Face model on a CUDA device: the Triton path end to end.

The kernel tests (tests/kernels/test_triton.py) check the kernel against the
reference op by op; these check what a user sees: ``convert`` of a model that
lives on the GPU, its forward (the op picks the Triton kernel), generation with
the bounded cache, in fp32 and bf16. Without CUDA every test here skips and
says so; ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import nanite_compile
from nanite_compile import NaniteConfig
from nanite_compile.kernels import ops

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run scripts/gpu_check.sh there)")

VOCAB = 256


def cuda_llama(dtype=torch.float32, attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(cfg).eval().to("cuda", dtype)


def ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g).cuda()


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits.float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_one_equals_original_on_cuda(attn):
    model = cuda_llama(attn=attn)
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=64, window=2, anchors=1, budget=1.0))
    x = ids(700)
    ref, out = logits(model, x), logits(conv, x)
    assert torch.isfinite(out).all()
    # fp32 on the GPU: SDPA and the tiled path reduce in different orders (tf32 is off)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_budget_runs_the_triton_kernel(dtype):
    model = cuda_llama(dtype)
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=64, window=2, anchors=1, budget=0.25))
    x = ids(2048)
    with ops.recording(measure_error=True) as rec:
        out = logits(conv, x)
    assert torch.isfinite(out).all()
    calls = [r for site in rec.values() for r in site]
    assert calls, "the converted model never called the tiled op"
    tiled = [r for r in calls if r["path"] == "tiled"]
    assert tiled, f"no call took the tiled path: {calls}"
    assert {r["impl"] for r in tiled} == {"triton_attn"}, [r["impl"] for r in tiled]
    for r in tiled:
        assert r["reads_per_query"] < 0.5 * r["exact_reads_per_query"]
        # random weights attend diffusely: the error is large but bounded
        assert r["rel_error"] < 1.0


def test_padded_batch_on_cuda():
    model = cuda_llama()
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=64, window=2, anchors=1, budget=1.0))
    x = ids(300, batch=2)
    mask = torch.ones_like(x)
    mask[1, 250:] = 0  # right padding
    ref = logits(model, x, attention_mask=mask)
    out = logits(conv, x, attention_mask=mask)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :250], ref[1, :250], rtol=1e-4, atol=1e-4)


def test_generate_on_cuda_matches_at_full_budget():
    model = cuda_llama()
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=64, window=2, anchors=1, budget=1.0))
    x = ids(200)
    with torch.no_grad():
        want = model.generate(x, max_new_tokens=12, do_sample=False)
        got = nanite_compile.generate(conv, x, max_new_tokens=12)
    assert torch.equal(got.cpu(), want.cpu())


def test_bounded_generation_on_cuda_runs():
    model = cuda_llama()
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=64, window=2, anchors=1, budget=0.25))
    x = ids(1500)
    with torch.no_grad():
        got = nanite_compile.generate(conv, x, max_new_tokens=8)
    assert got.shape == (1, 1508) and got.device.type == "cuda"
    assert torch.equal(got[:, :1500], x)
