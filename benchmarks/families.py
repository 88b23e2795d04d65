"""Which model families convert: every Hugging Face transformers family in the lists is
built small with random weights (no download), converted, and run on random tokens.

    .venv/bin/python benchmarks/families.py                       # the default lists
    .venv/bin/python benchmarks/families.py --families Llama Bloom --json families.json
    .venv/bin/python benchmarks/families.py --encoders Bert --seq2seq T5

Per family: the attention sites in the report, how many were rewritten, the reasons of
the skipped ones, the largest |logit| difference from the original at budget 1.0 (the
tiled op keeps every tile exact there, so this is 0 or rounding) and whether budget 0.25
gives finite logits. A family whose *original* forward fails on the small config is
listed as not built (a limit of this script's config, not of the compiler); a failure in
``convert`` or in the converted forward is a FAIL and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

import nanite_compile
from nanite_compile import NaniteConfig

# families checked by default: decoder-only LMs with a ``<Family>ForCausalLM`` class
DEFAULT_FAMILIES = (
    "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen2Moe", "Qwen3", "Qwen3Next", "Gemma", "Gemma2",
    "Gemma3", "Phi", "Phi3", "Phimoe", "Olmo", "Olmo2", "Olmoe", "StableLm", "Starcoder2",
    "Falcon", "FalconH1", "GPTJ", "GPTNeo", "GPTNeoX", "GPT2", "GPTBigCode", "OPT", "CodeGen",
    "Cohere", "Cohere2", "Granite", "GraniteMoe", "Persimmon", "SmolLM3", "BioGpt", "Helium",
    "Glm", "Glm4", "Exaone4", "Ernie4_5", "Nemotron", "JetMoe", "Ministral", "Arcee", "SeedOss",
    "HunYuanDenseV1", "Lfm2", "Cwm", "DiffLlama", "DeepseekV2", "DeepseekV3", "MiniCPM3",
    "Jamba", "Llama4", "ModernBertDecoder", "VaultGemma", "Doge", "Mpt", "Bloom", "XGLM",
    "GptOss",
)  # fmt: skip
# encoders (``<Family>Model``) and encoder-decoders, run on a padded batch of two
ENCODER_FAMILIES = (
    "Bert", "Roberta", "DistilBert", "Electra", "Albert", "XLMRoberta", "ModernBert", "Ernie",
    "RoFormer", "MegatronBert", "BigBird", "Splinter", "Canine", "Deberta", "DebertaV2", "MPNet",
)  # fmt: skip
SEQ2SEQ_FAMILIES = ("T5", "UMT5", "LongT5", "Bart", "MBart", "LED", "BigBirdPegasus")

VOCAB, TOKENS, TILE = 128, 200, 16

# small shapes, set on whichever of these names a family's config has
_SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512, n_ctx=512, d_model=64,
    ffn_dim=128, num_layers=2, max_seq_len=512, rotary_dim=8, moe_intermediate_size=32,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, dim=64, hidden_dim=128, n_layers=2, n_heads=4, d_ff=128, num_heads=4,
    d_kv=16, embedding_size=64, local_attention=64, global_attn_every_n_layers=2,
    encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=2,
    decoder_attention_heads=4, decoder_ffn_dim=128, num_decoder_layers=2,
)  # fmt: skip
# the causal LM class where it is not ``<Family>ForCausalLM``
_MODEL_CLASS = {"GPT2": "GPT2LMHeadModel"}
# multi-head latent attention: head widths of their own (no head_dim, no GQA setting)
_OWN_HEAD_WIDTHS = {"DeepseekV2", "DeepseekV3", "MiniCPM3"}


def small_config(family: str):
    """The family's config with small shapes; hybrids keep their layer pattern up to the
    first attention layer and one more."""
    import transformers

    cls = getattr(transformers, f"{family}TextConfig", None) or getattr(
        transformers, f"{family}Config"
    )
    cfg = cls()
    for name, value in _SMALL.items():
        if family in _OWN_HEAD_WIDTHS and name in ("head_dim", "num_key_value_heads"):
            continue
        if hasattr(cfg, name):
            try:
                setattr(cfg, name, value)
            except (AttributeError, TypeError, ValueError):
                pass
    pattern = list(getattr(cls(), "layer_types", None) or [])
    if pattern:
        attn = [i for i, t in enumerate(pattern) if "attention" in t and "linear" not in t]
        n = min(len(pattern), attn[0] + 2 if attn else 2)
        try:
            cfg.layer_types = pattern[:n]
        except (AttributeError, TypeError):  # derived from other fields (FalconH1, Jamba)
            pass
        cfg.num_hidden_layers = n
    if hasattr(cfg, "attn_layer_offset"):  # Jamba: attention at layer 1 of 2
        cfg.attn_layer_offset, cfg.attn_layer_period = 1, 2
    return cfg


def _inputs(kind: str) -> tuple[dict, torch.Tensor]:
    """The forward's inputs and which output positions are real (not padding)."""
    g = torch.Generator().manual_seed(1)
    if kind == "decoder":
        ids = torch.randint(3, VOCAB, (1, TOKENS), generator=g)
        return {"input_ids": ids}, torch.ones(1, TOKENS, dtype=torch.bool)
    ids = torch.randint(3, VOCAB, (2, TOKENS), generator=g)
    mask = torch.ones_like(ids)
    mask[1, TOKENS * 3 // 4 :] = 0  # the second row ends in padding
    if kind == "encoder":
        return {"input_ids": ids, "attention_mask": mask}, mask.bool()
    dec = ids[:, : TOKENS // 4]
    return ({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec},
            torch.ones_like(dec, dtype=torch.bool))  # fmt: skip


def _first_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def check(family: str, kind: str = "decoder") -> dict:
    """Convert one family at budgets 1.0 and 0.25; the row of the table. ``kind``:
    ``decoder`` (``<Family>ForCausalLM`` on one row of tokens), ``encoder`` or ``seq2seq``
    (``<Family>Model`` on a padded batch; differences are taken on the real positions)."""
    import transformers

    row: dict = {"family": family, "kind": kind}
    t0 = time.perf_counter()
    try:
        default = f"{family}ForCausalLM" if kind == "decoder" else f"{family}Model"
        model_cls = getattr(transformers, _MODEL_CLASS.get(family, default))
        torch.manual_seed(0)
        model = model_cls(small_config(family)).eval()
        inputs, real = _inputs(kind)
        with torch.no_grad():
            ref = _first_output(model(**inputs))
    except Exception as e:  # the small config, not the compiler
        row.update(status="not built", error=f"{type(e).__name__}: {str(e)[:160]}")
        return row
    try:
        for budget in (1.0, 0.25):
            cfg = NaniteConfig(tile=TILE, window=2, anchors=1, budget=budget)
            conv = nanite_compile.convert(model, config=cfg)
            with torch.no_grad():
                out = _first_output(conv(**inputs))[real]
            if budget == 1.0:
                sites = nanite_compile.report(conv).sites
                row["sites"] = len(sites)
                row["rewritten"] = sum(s.status == "rewritten" for s in sites)
                row["skipped"] = sorted({s.reason for s in sites if s.status != "rewritten"})
                row["max_diff_budget_1"] = float((out - ref[real]).abs().max())
            else:
                row["finite_budget_0.25"] = bool(torch.isfinite(out).all())
        row["status"] = "ok" if row["finite_budget_0.25"] else "FAIL"
    except Exception as e:
        row.update(status="FAIL", error=f"{type(e).__name__}: {str(e)[:160]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def reasons(r):
        text = "; ".join(r.get("skipped", []))
        return text if len(text) <= 90 else text[:87] + "..."

    body = [
        [r["family"], r["kind"], r["status"], r.get("sites", ""),
         r.get("rewritten", ""), reasons(r) or r.get("error", "")[:90],
         "" if "max_diff_budget_1" not in r else f"{r['max_diff_budget_1']:.1e}",
         r.get("finite_budget_0.25", "")]
        for r in rows
    ]  # fmt: skip
    head = ["family", "kind", "status", "sites", "rewritten", "skipped: reason", "max |d| @1.0",
            "finite @0.25"]  # fmt: skip
    return tabulate(body, headers=head, tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=None,
                    help="decoder families (default: the built-in lists of all three kinds)")
    ap.add_argument("--encoders", nargs="*", default=None, help="encoder families")
    ap.add_argument("--seq2seq", nargs="*", default=None, help="encoder-decoder families")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    chosen = (args.families, args.encoders, args.seq2seq)
    if all(c is None for c in chosen):
        chosen = (DEFAULT_FAMILIES, ENCODER_FAMILIES, SEQ2SEQ_FAMILIES)
    rows = []
    for kind, fams in zip(("decoder", "encoder", "seq2seq"), chosen, strict=True):
        for fam in fams or ():
            rows.append(check(fam, kind))
            print(f"{fam} ({kind}): {rows[-1]['status']}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    built = [r for r in rows if r["status"] != "not built"]
    print(f"\n{sum(r['status'] == 'ok' for r in built)} of {len(built)} families converted and "
          f"ran; {len(rows) - len(built)} not built by this script's small config")  # fmt: skip
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
