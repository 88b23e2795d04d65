"""The report to look at (issue 5): level-table and budget PNGs and one HTML page.

The PNGs are opened (size, more than one colour, the level colours present),
the HTML is parsed (one table row per site, one plan row per rewritten site,
every ``img`` points at a file that exists); the op records the level table
it ran with when asked, identical to the reference driver's.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser

import pytest
import torch

import nanite_compile
from nanite_compile import NaniteConfig, RewriteReport, SiteReport
from nanite_compile.kernels.levels import EXACT, NONE, STATE, TileParams
from nanite_compile.kernels.ops import recording
from nanite_compile.kernels.reference import tiled_attention
from nanite_compile.report_html import level_colors, plan_levels, save_report

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402  (after the importorskip)

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


class Page(HTMLParser):
    """Rows of each table (by id) and the img sources of a page."""

    def __init__(self, text):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.imgs: list[str] = []
        self._table = None
        self._in_body = False
        self._row = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.imgs.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def colours(path):
    img = Image.open(path).convert("RGB")
    return img.size, {c for _, c in img.getcolors(maxcolors=1 << 20)}


def rgb255(c):
    return tuple(round(x * 255) for x in c)


@pytest.fixture(scope="module")
def converted():
    return nanite_compile.convert(tiny_llama(), config=NaniteConfig(tile=16, budget=0.25))


def test_op_records_its_level_table():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 8, generator=g) for _ in range(3))
    k = k[:, :2]
    v = v[:, :2]
    plan = (16, 2, 1, -1, 0.25, 0, 64, 0, "s")
    with recording() as plain:
        torch.ops.nanite.tiled_attention(q, k, v, None, 0.35, True, *plan)
    assert "levels" not in plain["s"][0]
    with recording(levels=True) as rec:
        torch.ops.nanite.tiled_attention(q, k, v, None, 0.35, True, *plan)
    got = rec["s"][0]["levels"]
    stats = {}
    params = TileParams(
        tile=16,
        window=2,
        anchors=1,
        horizon=None,
        budget=0.25,
        budget_reads=None,
        state_features=64,
    )
    tiled_attention(q, k, v, None, scale=0.35, is_causal=True, params=params, stats=stats)
    assert got.dtype == torch.int8 and got.device.type == "cpu"
    assert torch.equal(got, stats["levels"][0].cpu())  # first batch element, every KV head
    assert tuple(got.shape) == (2, 16, 16)


def test_save_report_of_a_converted_model(converted, tmp_path):
    page = save_report(converted, tmp_path, heads=(0, 1))
    assert page == tmp_path / "report.html"
    rep = nanite_compile.report(converted)
    doc = Page(page.read_text(encoding="utf-8"))
    sites = doc.tables["sites"]
    assert [row[0] for row in sites] == [s.site for s in rep.sites] and len(sites) == 2
    assert all(row[3] == "rewritten" and row[4] == "tiled" for row in sites)
    assert [row[0] for row in doc.tables["plans"]] == [s.site for s in rep.rewritten]
    assert doc.tables["plans"][0][1] == "16"  # the tile column
    assert {"tile", "0.25"} <= {c for row in doc.tables["config"] for c in row}
    assert doc.imgs == ["levels.png", "budget.png"]
    for src in doc.imgs + ["report.png"]:
        size, cols = colours(tmp_path / src)
        assert size[0] >= 400 and size[1] >= 200, (src, size)
        assert len(cols) > 1, f"{src} is blank"
    # the level picture shows the levels the op recorded: exact, pooled and unseen tiles
    _, cols = colours(tmp_path / "levels.png")
    palette = level_colors(4)
    for lv in (EXACT, NONE, 4):
        assert rgb255(palette[lv]) in cols, lv
    assert "recorded" in page.read_text()
    assert (tmp_path / "report.json").is_file()


def test_save_report_from_a_saved_report_uses_the_plans(converted, tmp_path):
    rep = RewriteReport.from_json(nanite_compile.report(converted).to_json())
    page = save_report(rep, tmp_path)
    doc = Page(page.read_text())
    assert len(doc.tables["sites"]) == 2 and "levels.png" in doc.imgs
    assert "from the plan" in page.read_text()
    assert colours(tmp_path / "levels.png")[0][0] >= 400
    # the plan's table for uniform keys: near field and anchors exact, future unseen
    t = plan_levels(rep.sites[0])
    assert t.shape == (1, 16, 16)
    assert (t[0].diagonal() == EXACT).all() and (t[0, :, 0] == EXACT).all()
    future = torch.ones(16, 16, dtype=torch.bool).triu(1)
    # above the diagonal nothing; below it a middle tile may be dropped (NONE)
    assert (t[0][future] == NONE).all() and (t[0][~future] != NONE).any()


def test_given_levels_state_and_no_levels(tmp_path):
    site = SiteReport(
        site="<root>",
        module_path="",
        pattern="eager",
        mask_kind="causal",
        q_shape=None,
        k_shape=None,
        status="rewritten",
        plan={
            "tile": 4,
            "window": 1,
            "anchors": 0,
            "horizon": None,
            "budget": 0.1,
            "budget_reads": None,
            "state_features": 8,
        },
        runtime_path="tiled",
        reads_per_query=3.0,
        exact_reads_per_query=10.0,
    )
    skipped = SiteReport(
        site="enc.attn",
        module_path="enc.attn",
        pattern="sdpa",
        mask_kind="bias",
        q_shape=None,
        k_shape=None,
        status="skipped",
        reason="mask is <an additive bias>",
    )
    rep = RewriteReport(model="Toy", config={"budget": 0.1}, sites=[site, skipped])
    table = torch.full((8, 8), NONE, dtype=torch.int8)
    for j in range(8):
        table[j, : j + 1] = STATE
        table[j, j] = EXACT
        if j:
            table[j, j - 1] = 1
    page = save_report(rep, tmp_path / "a", levels={"<root>": table})
    text = page.read_text()
    doc = Page(text)
    assert [r[0] for r in doc.tables["sites"]] == ["<root>", "enc.attn"]  # escaped, parsed back
    assert doc.tables["sites"][1][-1] == "mask is <an additive bias>"
    assert len(doc.tables["plans"]) == 1
    _, cols = colours(tmp_path / "a" / "levels.png")
    assert rgb255(level_colors(2)[STATE]) in cols
    page = save_report(rep, tmp_path / "b", levels=False)
    assert Page(page.read_text()).imgs == ["budget.png"]
    assert not (tmp_path / "b" / "levels.png").exists()
    with pytest.raises(ValueError, match="unknown site"):
        save_report(rep, tmp_path / "c", sites=["nope"])
    with pytest.raises(TypeError, match="RewriteReport"):
        save_report("report", tmp_path / "c")


def test_no_level_pictures_and_bad_heads_of_a_default_config(tmp_path):
    """A default config leaves ``tile`` None (it follows the heads): ``levels=False`` and
    ``max_sites=0`` (the CLI's ``--report-sites 0``) crashed reading it for the legend.
    Negative or absent KV heads are errors that say what the sites have (``--heads 7``
    on two KV heads drew nothing, silently)."""
    conv = nanite_compile.convert(tiny_llama(), budget=0.25)
    assert nanite_compile.report(conv).config["tile"] is None
    for i, kw in enumerate([dict(levels=False), dict(max_sites=0)]):
        page = save_report(conv, tmp_path / str(i), **kw)
        assert Page(page.read_text()).imgs == ["budget.png"], kw
    with pytest.raises(ValueError, match="0 or more"):
        save_report(conv, tmp_path / "n", heads=(-1,))
    with pytest.raises(ValueError, match=r"which have 2 KV head\(s\): pass heads from 0 to 1"):
        save_report(conv, tmp_path / "n", heads=(7,))
    page = save_report(conv, tmp_path / "ok", heads=(1, 7))  # one of them drawn
    assert "levels.png" in Page(page.read_text()).imgs


def test_a_per_query_selection_shows_what_it_computes(tmp_path):
    """Under select="query" a site reads less than it computes (the union of its queries'
    tiles): the sites table gets a computed/orig column and the budget picture draws
    the computed share as an outline above the reads bar; a report without such a site
    has neither."""
    plan = {"tile": 4, "window": 1, "anchors": 0, "horizon": None, "budget": 0.25,
            "budget_reads": None, "state_features": 0, "select": "query"}
    site = SiteReport(site="attn", module_path="attn", pattern="sdpa", mask_kind="causal",
                      q_shape=None, k_shape=None, status="rewritten", plan=plan,
                      runtime_path="tiled", reads_per_query=2.5, exact_reads_per_query=10.0,
                      computed_per_query=6.0)
    rep = RewriteReport(model="Toy", config={"budget": 0.25}, sites=[site])
    doc = Page(save_report(rep, tmp_path / "q", levels=False).read_text())
    assert doc.tables["sites"][0][5:9] == ["2.5", "10.0", "0.250", "0.600"]
    _, with_outline = colours(tmp_path / "q" / "budget.png")
    row = SiteReport.from_dict({**site.to_dict(), "computed_per_query": None})
    rep = RewriteReport(model="Toy", config={"budget": 0.25}, sites=[row])
    doc = Page(save_report(rep, tmp_path / "r", levels=False).read_text())
    assert len(doc.tables["sites"][0]) == len(Page(
        (tmp_path / "q" / "report.html").read_text()).tables["sites"][0]) - 1
    _, without = colours(tmp_path / "r" / "budget.png")
    assert len(with_outline - without) > 0  # the hatched outline and its legend


def test_matplotlib_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rep = RewriteReport(model="Toy", config={}, sites=[])
    with pytest.raises(ImportError, match="pip install matplotlib"):
        save_report(rep, tmp_path)
