"""Property-based fuzzing of the JSON readers (issue 6, "Hostile and broken input").

``NaniteConfig.from_json``, ``RewriteReport.from_json`` and the save-file reader
(``nanite_compile.io.read_saved``) are given arbitrary JSON, mutated valid
documents and broken text. Each either returns an object that round-trips
(read back from its own JSON it is equal), or raises ``ValueError`` /
``TypeError`` (``NaniteLoadError`` is a ``ValueError``) with a message; never
another exception type, never a crash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nanite_compile import NaniteConfig, RewriteReport, SiteReport

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DEEP = "[" * 5000 + "]" * 5000  # nesting beyond the json module's recursion limit

# --------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)

CONFIG_KEYS = sorted(NaniteConfig().to_dict())
SITE_KEYS = sorted(SiteReport.__dataclass_fields__)


def valid_report() -> RewriteReport:
    sites = [
        SiteReport(
            site="model.layers.0.self_attn",
            module_path="model.layers.0.self_attn",
            pattern="sdpa",
            mask_kind="causal",
            q_shape=[1, 4, "s0", 8],
            k_shape=[1, 2, "s0", 8],
            status="rewritten",
            plan={"tile": 16, "window": 2, "budget": 0.25},
            runtime_path="tiled",
            runtime_mask="causal",
            reads_per_query=40.5,
            exact_reads_per_query=100.0,
            flops_before=1e6,
            flops_after=4e5,
            rel_error=0.01,
            measured_shape=[1, 4, 200, 8],
        ),  # fmt: skip
        SiteReport(
            site="model.layers.1.self_attn",
            module_path="model.layers.1.self_attn",
            pattern="eager",
            mask_kind="bias",
            q_shape=None,
            k_shape=None,
            status="skipped",
            reason="additive score bias derived from parameters or buffers",
        ),  # fmt: skip
    ]
    return RewriteReport(
        model="LlamaForCausalLM", config=NaniteConfig().to_dict(), sites=sites, notes=["n"]
    )


def _paths(doc, prefix=()):
    """Every path (tuple of keys/indices) into a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, doc):
    """``doc`` with a few edits: a value replaced, a key dropped or added, a type changed."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "add", "wrap"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "drop":
            del parent[last]
        elif action == "wrap":
            parent[last] = [parent[last]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return doc


@st.composite
def broken_text(draw, text):
    """``text`` truncated, or with characters deleted, inserted or replaced."""
    how = draw(st.sampled_from(["truncate", "delete", "insert", "replace"]))
    i = draw(st.integers(0, len(text)))
    if how == "truncate":
        return text[:i]
    if how == "delete":
        j = draw(st.integers(i, min(len(text), i + 8)))
        return text[:i] + text[j:]
    junk = draw(st.text(min_size=1, max_size=4))
    return text[:i] + junk + text[i + (how == "replace") :]


def _same(a, b) -> bool:
    """Equality that counts NaN equal to NaN (a parsed document may hold NaN)."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(
        b, sort_keys=True, default=repr
    )


def check_reader(read, text):
    """``read(text)`` returns a round-tripping object or raises ValueError/TypeError."""
    try:
        obj = read(text)
    except (ValueError, TypeError) as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return None
    again = read(obj.to_json())
    assert _same(again.to_dict(), obj.to_dict()), "does not round-trip through its own JSON"
    return obj


# --------------------------------------------------------------------- NaniteConfig


@SETTINGS
@given(json_values)
@example(None)
@example([])
@example({"budget": float("nan")})
@example({"tile": True})
@example({"extra": {"x": 1}})
@example({"feature_map": ["prf"]})
@example({"feature_map": {"a": 1}})
def test_config_from_arbitrary_json(value):
    check_reader(NaniteConfig.from_json, json.dumps(value))


@SETTINGS
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=5))
def test_config_with_known_keys_and_any_values(options):
    cfg = check_reader(NaniteConfig.from_json, json.dumps(options))
    if cfg is not None:
        for key, value in options.items():
            got = getattr(cfg, key)
            assert got == value or (key == "budget" and got == float(value)), (key, value, got)


@SETTINGS
@given(mutated(NaniteConfig(budget=0.3, horizon=4, budget_reads=96).to_dict()))
def test_config_mutated_documents(doc):
    check_reader(NaniteConfig.from_json, json.dumps(doc))


@SETTINGS
@given(broken_text(NaniteConfig(budget=0.3).to_json()) | st.text(max_size=40))
@example(DEEP)
@example('{"budget": NaN}')
@example('{"budget": Infinity}')
@example('{"tile": 1e400}')
@example("\ud800")
def test_config_broken_text(text):
    check_reader(NaniteConfig.from_json, text)


@pytest.mark.parametrize("thing", [None, 3, b'{"budget": 0.5}', ["x"], {"budget": 0.5}])
def test_config_from_json_of_non_text(thing):
    check_reader(NaniteConfig.from_json, thing)


# --------------------------------------------------------------------- RewriteReport


def test_valid_report_round_trips():
    rep = valid_report()
    assert RewriteReport.from_json(rep.to_json()) == rep


@SETTINGS
@given(json_values)
@example({"version": 1})
@example({"version": 1, "model": "m"})
@example({"version": 1, "model": "m", "config": {}, "sites": "abc"})
@example({"version": 1, "model": "m", "config": {}, "sites": [], "notes": "abc"})
@example({"version": 1, "model": "m", "config": [], "sites": [[]]})
@example({"version": 1, "model": "m", "config": {}, "sites": [["site", "x"]]})
@example({"version": 1, "model": "m", "config": {}, "sites": [{"site": "x"}]})
def test_report_from_arbitrary_json(value):
    check_reader(RewriteReport.from_json, json.dumps(value))


@SETTINGS
@given(mutated(json.loads(valid_report().to_json())))
def test_report_mutated_documents(doc):
    check_reader(RewriteReport.from_json, json.dumps(doc))


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(SITE_KEYS), json_values, max_size=6).map(
        lambda over: {**json.loads(valid_report().to_json())["sites"][0], **over}
    )
)
def test_report_sites_with_any_field_values(site):
    doc = json.loads(valid_report().to_json())
    doc["sites"] = [site]
    rep = check_reader(RewriteReport.from_json, json.dumps(doc))
    if rep is not None:  # what parses is what a report holds
        s = rep.sites[0]
        assert s.status in ("rewritten", "skipped")
        for name in ("site", "module_path", "pattern", "mask_kind", "reason"):
            assert isinstance(getattr(s, name), str), name
        for name in ("reads_per_query", "exact_reads_per_query", "flops_before",
                     "flops_after", "rel_error"):  # fmt: skip
            value = getattr(s, name)
            assert value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            ), name
        for name in ("q_shape", "k_shape", "measured_shape"):
            value = getattr(s, name)
            assert value is None or isinstance(value, list), name


@SETTINGS
@given(broken_text(valid_report().to_json()) | st.text(max_size=40))
@example(DEEP)
def test_report_broken_text(text):
    check_reader(RewriteReport.from_json, text)


# --------------------------------------------------------------------- save files

io = pytest.importorskip("nanite_compile.io")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    from tiny_models import tiny_llama

    import nanite_compile

    model = tiny_llama(vocab=64, layers=1, max_pos=64)
    conv = nanite_compile.convert(model, config=NaniteConfig(tile=16, budget=0.3))
    d = tmp_path_factory.mktemp("saved")
    nanite_compile.save(conv, d)
    return d


def _sha(obj) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def rehash(header):
    """Recompute the document's own hashes, as someone editing it on purpose would."""
    try:
        sums = header["sha256"]
        sums["plan"] = _sha({"config": header["config"], "plans": header["plans"]})
        sums["report"] = _sha(header["report"])
        fp = header["model"]
        fp["sha256"] = _sha({"class": fp.get("class"), "parameters": fp.get("parameters")})
    except (KeyError, TypeError, AttributeError):
        pass  # the edit broke the structure the hashes live in
    return header


def check_read_saved(directory, text):
    (directory / io.JSON_NAME).write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        saved = io.read_saved(directory)
    except (ValueError, TypeError) as e:
        assert str(e).strip()
        return None
    assert isinstance(saved.config, NaniteConfig) and isinstance(saved.report, RewriteReport)
    return saved


@pytest.fixture
def work_dir(saved_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved_dir, d)
    return d


def test_save_file_reads(saved_dir):
    saved = io.read_saved(saved_dir)
    assert saved.config.budget == 0.3


@SETTINGS
@given(data=st.data())
def test_save_file_mutated_and_rehashed(work_dir, saved_dir, data):
    header = json.loads((saved_dir / io.JSON_NAME).read_text())
    doc = data.draw(mutated(header))
    if data.draw(st.booleans()):
        doc = rehash(doc)
    check_read_saved(work_dir, json.dumps(doc))


@SETTINGS
@given(data=st.data())
def test_save_file_broken_text(work_dir, saved_dir, data):
    text = (saved_dir / io.JSON_NAME).read_text()
    check_read_saved(work_dir, data.draw(broken_text(text) | json_values.map(json.dumps)))


@pytest.mark.parametrize("where", ["json", "json_entry", "safetensors_header"])
def test_save_file_nested_too_deep(work_dir, where):
    """Nesting past Python's recursion limit is a refusal, not a RecursionError."""
    if where == "safetensors_header":
        head = ('{"__metadata__": ' + DEEP + "}").encode()
        (work_dir / io.TENSORS_NAME).write_bytes(len(head).to_bytes(8, "little") + head)
        with pytest.raises(io.NaniteLoadError, match="damaged"):
            io.read_saved(work_dir)
        return
    text = DEEP if where == "json" else '{"format": "nanite_compile", "x": ' + DEEP + "}"
    (work_dir / io.JSON_NAME).write_text(text)
    with pytest.raises(io.NaniteLoadError, match="nested too deeply"):
        io.read_saved(work_dir)


@SETTINGS
@given(data=st.data())
def test_save_file_rehashed_sections(work_dir, saved_dir, data):
    """Config, plans and report replaced by anything, hashes made to match: refused or read."""
    header = json.loads((saved_dir / io.JSON_NAME).read_text())
    key = data.draw(st.sampled_from(["config", "plans", "report", "tensors", "model"]))
    header[key] = data.draw(
        json_values | mutated(header[key]) | st.just(json.loads(valid_report().to_json()))
    )
    assume(key != "model" or isinstance(header[key], dict))
    check_read_saved(work_dir, json.dumps(rehash(header)))
