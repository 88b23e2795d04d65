"""Long running (issue 6): 100 forwards of varying lengths on one compiled / converted model.

Under ``torch.compile(model, backend="nanite", dynamic=True)`` and under
``convert``, a tiny Llama runs 100 forwards of seeded random lengths (below a
tile to many tiles, some with a padding mask). Checked:

- the number of compiled graphs stays bounded: whatever the first forwards
  compiled, the second half of the run compiles nothing new (dynamic shapes,
  no recompilation per length), and the graph count stays within a small
  constant well below Dynamo's recompile limit;
- the tiled op still runs at the end (a model that ran out of recompilations
  would silently fall back to the original attention);
- memory does not grow: resident memory (``/proc/self/statm``) and Python
  allocations (``tracemalloc``) after the second half are within a small bound
  of what they were after the first half.
"""

from __future__ import annotations

import gc
import os
import random
import tracemalloc

import pytest
import torch

import nanite_compile
from nanite_compile import NaniteConfig
from nanite_compile.backend import NaniteBackend
from nanite_compile.kernels.ops import recording

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama as _tiny_llama  # noqa: E402  (after the importorskip)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc"
)

VOCAB = 128
TILE = 16
MAX_LEN = 160
FORWARDS = 100
MAX_GRAPHS = 6  # per captured function: lengths, mask or none, a length-1 specialisation
RSS_GROWTH = 0.05  # of the resident size after the first half
PY_GROWTH_BYTES = 2 * 2**20  # Python allocations over the whole second half
OPTIONS = {"budget": 0.25, "tile": TILE, "inner": "eager"}


def tiny_llama():
    return _tiny_llama(vocab=VOCAB)


def workload():
    """100 (input_ids, attention_mask or None) of random lengths; the longest comes first so
    the allocator has seen the largest sizes before anything is measured."""
    rng = random.Random(6)
    g = torch.Generator().manual_seed(6)
    lengths = [MAX_LEN] + [rng.randint(2, MAX_LEN) for _ in range(FORWARDS - 1)]
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (2, n), generator=g)
        mask = None
        if i % 3 == 1:  # left padding of the second row
            mask = torch.ones(2, n, dtype=torch.long)
            mask[1, : rng.randint(1, n - 1)] = 0
        out.append((ids, mask))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_all(model, inputs, count_graphs):
    """Run every forward; returns (graphs after the first half, after all, memory figures)."""
    half = len(inputs) // 2
    with torch.no_grad():
        for ids, mask in inputs[:half]:
            model(input_ids=ids, attention_mask=mask)
        gc.collect()
        graphs_half = count_graphs()
        rss_half = rss_bytes()
        tracemalloc.start()
        try:
            py_half = tracemalloc.get_traced_memory()[0]
            for ids, mask in inputs[half:-1]:
                model(input_ids=ids, attention_mask=mask)
            gc.collect()
            py_end = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        rss_end = rss_bytes()
        ids, mask = inputs[-1]
        with recording() as rec:
            model(input_ids=ids, attention_mask=mask)
    return graphs_half, count_graphs(), (rss_half, rss_end, py_half, py_end), rec


def check(graphs_half, graphs_end, mem, rec, n_functions):
    assert graphs_end == graphs_half, (
        f"the second half of the run compiled {graphs_end - graphs_half} new graph(s)"
    )
    assert 1 <= graphs_end <= MAX_GRAPHS * n_functions, f"{graphs_end} graphs compiled"
    assert graphs_end <= torch._dynamo.config.recompile_limit * n_functions
    assert rec, "the tiled op did not run on the last forward"
    for site, calls in rec.items():
        assert calls and calls[-1]["path"] in ("tiled", "exact"), (site, calls)
    assert any(c["path"] == "tiled" for calls in rec.values() for c in calls), rec
    rss_half, rss_end, py_half, py_end = mem
    assert rss_end <= rss_half * (1 + RSS_GROWTH), (
        f"resident memory grew from {rss_half / 2**20:.1f} MiB to {rss_end / 2**20:.1f} MiB "
        f"over {FORWARDS // 2} forwards"
    )
    assert py_end - py_half <= PY_GROWTH_BYTES, (
        f"Python allocations grew by {(py_end - py_half) / 2**20:.2f} MiB over the second half"
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile_backend_instance():
    """``torch.compile`` with a `NaniteBackend` instance: its ``graphs`` counter is the count."""
    backend = NaniteBackend(NaniteConfig.from_options(OPTIONS), inner="eager")
    compiled = torch.compile(tiny_llama(), backend=backend, dynamic=True)
    half, end, mem, rec = run_all(compiled, workload(), lambda: backend.graphs)
    assert {s.status for s in backend.sites} == {"rewritten"}, backend.sites
    check(half, end, mem, rec, n_functions=1)


def test_torch_compile_by_name():
    """``backend="nanite"`` with options, as a user writes it: graphs counted by Dynamo."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(tiny_llama(), backend="nanite", options=OPTIONS, dynamic=True)
    half, end, mem, rec = run_all(compiled, workload(), lambda: counters["stats"]["unique_graphs"])
    check(half, end, mem, rec, n_functions=1)
    rep = nanite_compile.report(compiled)
    assert len(rep.sites) == 2 and all(s.status == "rewritten" for s in rep.sites)


def test_convert():
    """``convert``: each captured module's backend counts its graphs."""
    converted = nanite_compile.convert(tiny_llama(), config=NaniteConfig(**OPTIONS))
    backends = converted.__dict__["_nanite_state"].backends
    assert backends, "nothing was captured"
    half, end, mem, rec = run_all(
        converted, workload(), lambda: sum(b.graphs for b in backends.values())
    )
    check(half, end, mem, rec, n_functions=len(backends))
    assert all(s.status == "rewritten" for s in nanite_compile.report(converted).sites)
