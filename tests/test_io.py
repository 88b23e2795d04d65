"""save / load (issue 5, "Save and load"): JSON and safetensors only, checked on load.

A round trip gives bit-identical outputs, also onto a model reloaded from
``save_pretrained``; damaged, truncated, edited, mismatched or pickled files
are refused with a `NaniteLoadError` that names the problem and the fix, and
nothing in them is ever executed.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
import torch.nn as nn

import nanite_compile
from nanite_compile import NaniteConfig, NaniteLoadError
from nanite_compile.io import JSON_NAME, TENSORS_NAME, read_saved

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402  (after the importorskip)

VOCAB = 128


def tiny_llama(hidden=32, dtype=torch.float32):
    return _tiny_llama(vocab=VOCAB, hidden=hidden, dtype=dtype)


def ids(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, converted, directory) with the converted model saved there."""
    model = tiny_llama()
    converted = nanite_compile.convert(model, config=NaniteConfig(tile=16, budget=0.3))
    d = tmp_path_factory.mktemp("saved")
    nanite_compile.save(converted, d, source="tiny-llama")
    return model, converted, d


@pytest.fixture
def copy_dir(saved, tmp_path):
    """A fresh copy of the save directory, to damage."""
    d = tmp_path / "copy"
    shutil.copytree(saved[2], d)
    return d


def test_files_are_json_and_safetensors(saved):
    _, converted, d = saved
    assert sorted(p.name for p in d.iterdir()) == [JSON_NAME, TENSORS_NAME]
    header = json.loads((d / JSON_NAME).read_text())
    assert header["format"] == "nanite_compile" and header["format_version"] == 1
    assert header["config"] == converted.__dict__["_nanite_state"].config.to_dict()
    rep = nanite_compile.report(converted)
    assert header["plans"] == {s.site: s.plan for s in rep.rewritten}
    assert len(header["plans"]) == 2 and header["plans"]["model.layers.0.self_attn"]["tile"] == 16
    assert header["model"]["class"].endswith("LlamaForCausalLM")
    names = [p[0] for p in header["model"]["parameters"]]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert header["source"] == "tiny-llama"
    assert set(header["sha256"]) == {"plan", "report", "tensors_file"}
    # the tensors file is plain safetensors (no learned tensors in this version)
    from safetensors import safe_open

    with safe_open(str(d / TENSORS_NAME), "pt") as f:
        assert list(f.keys()) == []
        assert f.metadata()["nanite_format_version"] == "1"
    s = read_saved(d)
    assert s.config == converted.__dict__["_nanite_state"].config
    assert s.report.to_json() == rep.to_json()


def test_saving_onto_a_file_is_a_clear_error(saved, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="is a file; save writes a directory"):
        nanite_compile.save(saved[1], f)
    assert f.read_bytes() == b"x"


def test_round_trip_is_bitwise(saved):
    model, converted, d = saved
    loaded = nanite_compile.load(d, model)
    assert type(loaded) is type(model)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(converted, x))
    rep = nanite_compile.report(loaded)
    assert [s.plan for s in rep.sites] == [s.plan for s in nanite_compile.report(converted).sites]
    assert loaded.__dict__["_nanite_state"].config == NaniteConfig(tile=16, budget=0.3)


def test_round_trip_onto_a_reloaded_model_with_learned_tensors(saved, tmp_path):
    """A fresh model from save_pretrained; learned tensors go to safetensors and come back."""
    model, converted, _ = saved
    state = converted.__dict__["_nanite_state"]
    proj = torch.randn(2, 8, 4)
    state.learned = {"model.layers.0.self_attn/feature_proj": proj}
    try:
        nanite_compile.save(converted, tmp_path / "nanite")
    finally:
        del state.learned
    header = json.loads((tmp_path / "nanite" / JSON_NAME).read_text())
    assert header["tensors"] == {
        "model.layers.0.self_attn/feature_proj": {"shape": [2, 8, 4], "dtype": "float32"}
    }
    model.save_pretrained(tmp_path / "hf")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    loaded = nanite_compile.load(tmp_path / "nanite", fresh)
    x = ids(seed=2)
    assert torch.equal(logits(loaded, x), logits(converted, x))
    got = loaded.__dict__["_nanite_state"].learned
    assert torch.equal(got["model.layers.0.self_attn/feature_proj"], proj)


def test_a_save_from_before_max_level_and_select_keeps_what_it_ran(tmp_path):
    """A save written before the options existed (no max_level, select nor row_tiles in
    its config nor in its plans; every pooled level was used, one table row per query
    tile) loads, with max_level None, select "row", row_tiles 1 and the same outputs,
    not with today's default nor refused for plans that differ by the new keys."""
    from nanite_compile.io import _plan_hash

    model = tiny_llama()
    converted = nanite_compile.convert(model, config=NaniteConfig(tile=16, budget=0.3,
                                                                  max_level=None))
    nanite_compile.save(converted, tmp_path, source="tiny-llama")
    header = json.loads((tmp_path / JSON_NAME).read_text())
    for key in ("max_level", "select", "row_tiles"):
        del header["config"][key]
        for plan in header["plans"].values():
            del plan[key]
    header["sha256"]["plan"] = _plan_hash(header["config"], header["plans"])
    (tmp_path / JSON_NAME).write_text(json.dumps(header))
    loaded = nanite_compile.load(tmp_path, model)
    config = loaded.__dict__["_nanite_state"].config
    assert config.max_level is None and config.select == "row" and config.row_tiles == 1
    plans = {s.site: s.plan for s in nanite_compile.report(loaded).sites}
    assert plans and all(p["max_level"] is None and p["select"] == "row" and p["row_tiles"] == 1
                         for p in plans.values())
    x = ids()
    assert torch.equal(logits(loaded, x), logits(converted, x))


def test_a_per_query_selection_saves_and_loads(tmp_path):
    model = tiny_llama()
    converted = nanite_compile.convert(model, config=NaniteConfig(tile=16, budget=0.3,
                                                                  select="query"))
    nanite_compile.save(converted, tmp_path, source="tiny-llama")
    loaded = nanite_compile.load(tmp_path, model)
    assert loaded.__dict__["_nanite_state"].config.select == "query"
    assert {s.plan["select"] for s in nanite_compile.report(loaded).sites} == {"query"}
    x = ids()
    assert torch.equal(logits(loaded, x), logits(converted, x))


def _edit(d, fn):
    header = json.loads((d / JSON_NAME).read_text())
    fn(header)
    (d / JSON_NAME).write_text(json.dumps(header))


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: (d / JSON_NAME).write_bytes((d / JSON_NAME).read_bytes()[:300]), "truncated"),
        (lambda d: (d / JSON_NAME).write_text("[1, 2]"), "not a nanite_compile save"),
        (lambda d: (d / JSON_NAME).write_bytes(pickle.dumps({"a": 1})), "pickle"),
        (
            lambda d: _edit(d, lambda h: h["plans"]["model.layers.0.self_attn"].update(tile=32)),
            "edited",
        ),
        (lambda d: _edit(d, lambda h: h["config"].update(budget=0.9)), "edited"),
        (lambda d: _edit(d, lambda h: h["report"]["sites"].pop()), "report was edited"),
        (lambda d: _edit(d, lambda h: h["model"]["parameters"].pop()), "fingerprint was edited"),
        (lambda d: _edit(d, lambda h: h.update(format_version=99)), "upgrade"),
        (lambda d: _edit(d, lambda h: h.pop("sha256")), "sha256"),
        (
            lambda d: (d / TENSORS_NAME).write_bytes(pickle.dumps({"w": [1.0]}, protocol=4)),
            "pickle",
        ),
        (lambda d: torch.save({"w": torch.ones(2)}, d / TENSORS_NAME), "zip archive"),
        (
            lambda d: (d / TENSORS_NAME).write_bytes((d / TENSORS_NAME).read_bytes()[:20]),
            "truncated",
        ),
        (lambda d: (d / TENSORS_NAME).unlink(), "missing"),
        (lambda d: ((d / TENSORS_NAME).unlink(), torch.save({}, d / "nanite.pt")), "nanite.pt"),
        (lambda d: (d / JSON_NAME).unlink(), "missing"),
    ],
    ids=[
        "json-truncated",
        "json-not-ours",
        "json-is-pickle",
        "plan-edited",
        "config-edited",
        "report-edited",
        "fingerprint-edited",
        "newer-format",
        "no-hashes",
        "tensors-pickle",
        "tensors-torch-save",
        "tensors-truncated",
        "tensors-missing",
        "tensors-as-pt",
        "json-missing",
    ],
)
def test_damaged_files_are_refused(saved, copy_dir, damage, words):
    damage(copy_dir)
    with pytest.raises(NaniteLoadError, match=words) as e:
        nanite_compile.load(copy_dir, saved[0])
    msg = str(e.value)
    assert "\n" not in msg and ("nanite_compile" in msg or "convert" in msg), msg


def test_tensors_from_another_save_are_refused(saved, copy_dir):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, copy_dir / TENSORS_NAME)
    with pytest.raises(NaniteLoadError, match="does not belong"):
        nanite_compile.load(copy_dir, saved[0])


class _Boom:
    """Unpickling this would create a file: proof that nothing is unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_nothing_in_the_files_is_executed(saved, copy_dir, tmp_path):
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Boom(marker), protocol=2)
    for name in (TENSORS_NAME, JSON_NAME):
        d = tmp_path / name
        shutil.copytree(copy_dir, d)
        (d / name).write_bytes(payload)
        with pytest.raises(NaniteLoadError, match="pickle"):
            nanite_compile.load(d, saved[0])
    # a safetensors-shaped file whose header lies about its data
    d = tmp_path / "lying"
    shutil.copytree(copy_dir, d)
    head = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    (d / TENSORS_NAME).write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    with pytest.raises(NaniteLoadError, match="truncated or damaged"):
        nanite_compile.load(d, saved[0])
    assert not marker.exists()


def test_mismatched_models_are_refused(saved):
    d = saved[2]
    with pytest.raises(NaniteLoadError, match="another model size"):
        nanite_compile.load(d, tiny_llama(hidden=64))
    with pytest.raises(NaniteLoadError, match=r"bfloat16.*model.to\(torch.float32\)"):
        nanite_compile.load(d, tiny_llama(dtype=torch.bfloat16))
    other = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    with pytest.raises(NaniteLoadError, match="saved for a .*LlamaForCausalLM"):
        nanite_compile.load(d, other)
    with pytest.raises(NaniteLoadError, match="not a converted one"):
        nanite_compile.load(d, saved[1])
    with pytest.raises(NaniteLoadError, match="not a directory"):
        nanite_compile.load(d / "nowhere", saved[0])
    with pytest.raises(TypeError, match="nn.Module"):
        nanite_compile.load(d, "model")


def test_save_needs_a_converted_model(tmp_path):
    with pytest.raises(ValueError, match="nanite_compile.convert"):
        nanite_compile.save(nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError):
        nanite_compile.save("model", tmp_path)
    assert not any(tmp_path.iterdir())


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_lazily_captured_module_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Attn().eval()
    converted = nanite_compile.convert(model, config=NaniteConfig(tile=16))
    nanite_compile.save(converted, tmp_path)  # before its first forward: no sites yet
    assert json.loads((tmp_path / JSON_NAME).read_text())["pending"] is True
    loaded = nanite_compile.load(tmp_path, model)
    x = torch.randn(1, 96, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    assert nanite_compile.report(loaded).rewritten
