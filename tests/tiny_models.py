"""Small randomly initialised Hugging Face models the tests convert (importable from any
test file: pyproject's pytest ``pythonpath`` puts ``tests/`` on the path)."""

from __future__ import annotations

import torch
import transformers


def shape_kwargs(*, vocab: int, hidden: int, layers: int, heads: int, max_pos: int,
                 **extra) -> dict:
    """Config keywords of a small transformer in Llama's names (MLP ``2 * hidden`` wide),
    plus ``extra``; most Hugging Face text configs take them."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_pos,
        **extra,
    )


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
    cfg = transformers.LlamaConfig(**shape_kwargs(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, max_pos=max_pos,
        num_key_value_heads=kv_heads, **extra,
    ))  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)
