"""Small randomly initialised Hugging Face models the tests convert (importable from any
test file: pyproject's pytest ``pythonpath`` puts ``tests/`` on the path)."""

from __future__ import annotations

import torch
import transformers


def tiny_llama(
    *,
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_pos: int = 256,
    impl: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> transformers.LlamaForCausalLM:
    """A Llama with GQA (``heads / kv_heads`` query heads per KV head), MLP width
    ``2 * hidden``, weights drawn after ``torch.manual_seed(seed)``, in eval mode.
    ``impl`` sets ``attn_implementation`` (None: transformers' default)."""
    torch.manual_seed(seed)
    extra = {} if impl is None else {"attn_implementation": impl}
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        **extra,
    )
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)
