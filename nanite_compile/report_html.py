"""A report to look at: one HTML page and PNG pictures of what the compiler did.

    from nanite_compile.report_html import save_report
    save_report(converted, "report/")     # report/report.html, levels.png, budget.png, report.png

- ``levels.png``: for chosen sites and KV heads, the level table as a picture
  (query tile down, key tile across, colour = level: EXACT, POOL r, STATE,
  NONE). The tables are recorded from a real forward of the converted model
  (the calibration tokens, or the synthetic probe of a Hugging Face model);
  where none can be recorded they are rebuilt from the site's plan with
  uniform key density, and the picture says so.
- ``budget.png``: per site, key reads per query as a share of the original's,
  against the budget.
- ``report.png``: both in one picture, to share.
- ``report.html``: the report table, the plan per site, the configuration and
  the pictures; ``report.json`` next to it.

matplotlib is optional (``pip install matplotlib``); it is imported only here,
with its Agg canvas (no display, no global backend change).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .kernels.levels import EXACT, NONE, STATE, TileParams, build_levels
from .report import RewriteReport, SiteReport

__all__ = ["plan_levels", "record_levels", "save_report", "level_colors"]

_NONE_RGB = (0.97, 0.97, 0.97)
_STATE_RGB = (0.106, 0.620, 0.467)  # green
_EXACT_RGB = (0.698, 0.094, 0.169)  # dark red
_POOL_DARK = (0.129, 0.400, 0.675)  # POOL 1: dark blue
_POOL_LIGHT = (0.757, 0.867, 0.945)  # POOL max: light blue


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError(
            "the report pictures need matplotlib: pip install matplotlib "
            "(or pip install 'nanite-compile[report]')"
        ) from e
    return Figure, FigureCanvasAgg, Patch


def level_colors(max_pool: int) -> dict[int, tuple[float, float, float]]:
    """Colour of each level: EXACT red, POOL 1..max blue (lighter = coarser), STATE green,
    NONE near-white."""
    colors = {NONE: _NONE_RGB, STATE: _STATE_RGB, EXACT: _EXACT_RGB}
    for r in range(1, max_pool + 1):
        t = 0.0 if max_pool == 1 else (r - 1) / (max_pool - 1)
        colors[r] = tuple(a + (b - a) * t for a, b in zip(_POOL_DARK, _POOL_LIGHT, strict=True))
    return colors


def _level_names(max_pool: int, tile: int) -> dict[int, str]:
    names = {EXACT: f"EXACT ({tile} keys)"}
    for r in range(1, max_pool + 1):
        names[r] = f"POOL {r} ({tile >> r} mean{'s' if tile >> r > 1 else ''})"
    names[STATE] = "STATE (recurrent)"
    names[NONE] = "NONE (not seen)"
    return names


# ------------------------------------------------------------------ level tables


def record_levels(converted: nn.Module, calibration: Any = None) -> dict[str, torch.Tensor]:
    """Level tables of one forward of a converted model: site -> ``[Hkv, mq, mk]`` int8.

    Runs the converted model once on ``calibration`` (token ids ``[B, N]``) or,
    without it, on the synthetic probe ``convert`` uses for a Hugging Face
    model. Sites that ran exact have no table. Returns ``{}`` when no input
    can be made up (a plain module without calibration).
    """
    from .api import _calibration_batches, _probe_inputs
    from .kernels.ops import recording

    probe = _probe_inputs(converted, _calibration_batches(calibration))
    if probe is None:
        return {}
    args, kwargs = probe
    with torch.no_grad(), recording(levels=True) as rec:
        converted(*args, **kwargs)
    out = {}
    for site, recs in rec.items():
        tables = [r["levels"] for r in recs if r.get("levels") is not None]
        if tables:
            out[site] = tables[-1]
    return out


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def plan_levels(site: SiteReport, n: int | None = None) -> torch.Tensor | None:
    """The level table a site's plan gives ``n`` keys of uniform density, ``[1, mq, mk]``.

    ``n`` defaults to the length the site was measured on. None when the site
    was not rewritten or no length is known.
    """
    if site.status != "rewritten" or not site.plan:
        return None
    shape = site.measured_shape or site.k_shape or site.q_shape
    if n is None and shape and len(shape) >= 2:
        n = _int(shape[-2])
    if not n:
        return None
    p = site.plan
    params = TileParams(
        tile=p["tile"],
        window=p["window"],
        anchors=p["anchors"],
        horizon=p.get("horizon"),
        budget=p["budget"],
        budget_reads=p.get("budget_reads"),
        state_features=p.get("state_features", 0),
    )
    mk = -(-n // params.tile)
    mask = site.runtime_mask or site.mask_kind or ""
    return build_levels(
        torch.ones(1, 1, mk, dtype=torch.float64),
        torch.arange(mk),
        params,
        causal="causal" in mask,
        window=None,
        tile_valid=torch.ones(1, mk, dtype=torch.bool),
        nk=n,
    )[0]


def _as_table(t: Any) -> torch.Tensor:
    t = torch.as_tensor(t)
    while t.dim() > 3:
        t = t[0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(
            f"a level table must be [mq, mk], [Hkv, mq, mk] or [B, Hkv, mq, mk], "
            f"got shape {tuple(t.shape)}"
        )
    return t.to(torch.int8).cpu()


def _rgb(table: torch.Tensor, colors: dict) -> Any:
    import numpy as np

    lv = table.numpy().astype(np.int64)
    out = np.empty(lv.shape + (3,), dtype=np.float64)
    out[...] = _NONE_RGB
    for level, rgb in colors.items():
        out[lv == level] = rgb
    top = max(colors)
    out[lv > top] = colors[top]
    return out


# ------------------------------------------------------------------ pictures


def _short_names(names: list[str]) -> tuple[list[str], str]:
    """Drop the common prefix and suffix of dotted names: ``model.layers.3.self_attn`` -> ``3``."""
    if len(names) < 2:
        return names, ""
    parts = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre + 1 for p in parts) and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while all(len(p) > pre + suf + 1 for p in parts) and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    if pre == 0 and suf == 0:
        return names, ""
    short = [".".join(p[pre : len(p) - suf]) for p in parts]
    if len(set(short)) != len(short):
        return names, ""
    pattern = ".".join(parts[0][:pre] + ["*"] + parts[0][len(parts[0]) - suf :])
    return short, pattern


def _pick(items: list, k: int) -> list:
    """Up to ``k`` items spread evenly, first and last included."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def _draw_levels(axes, legend_ax, panels, tile, max_pool, Patch) -> None:
    colors = level_colors(max_pool)
    for ax, (title, table) in zip(axes, panels, strict=True):
        mq, mk = table.shape
        ax.imshow(
            _rgb(table, colors),
            interpolation="nearest",
            origin="upper",
            extent=(-0.5, mk - 0.5, mk - 0.5, mk - mq - 0.5),
            aspect="equal",
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key tile", fontsize=8)
        ax.set_ylabel("query tile", fontsize=8)
        ax.tick_params(labelsize=7)
    names = _level_names(max_pool, tile)
    order = [EXACT, *range(1, max_pool + 1), STATE, NONE]
    handles = [Patch(facecolor=colors[lv], edgecolor="0.6", label=names[lv]) for lv in order]
    legend_ax.axis("off")
    legend_ax.legend(
        handles=handles,
        loc="center left",
        fontsize=8,
        title="level",
        frameon=False,
        title_fontsize=9,
    )


def _draw_budget(ax, rep: RewriteReport) -> None:
    sites = rep.sites
    labels, pattern = _short_names([s.site for s in sites])
    ratios, colors = [], []
    for s in sites:
        ratios.append(1.0 if s.read_ratio is None else s.read_ratio)
        tiled = s.status == "rewritten" and s.runtime_path == "tiled"
        colors.append(_POOL_DARK if tiled else (0.65, 0.65, 0.65))
    x = list(range(len(sites)))
    if any(s.computed_per_query is not None for s in sites):  # select="query": the union
        ax.bar(x, [s.work_ratio or 0.0 for s in sites], color="none", edgecolor=_POOL_DARK, hatch="//",
               width=0.8, linewidth=0.6, label="computed (union of the queries' tiles)")
    ax.bar(x, ratios, color=colors, width=0.8)
    budget = rep.config.get("budget")
    if isinstance(budget, (int, float)) and not rep.config.get("budget_reads"):
        ax.axhline(
            budget, color=_EXACT_RGB, linestyle="--", linewidth=1.2, label=f"budget {budget:g}"
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("key reads per query / original", fontsize=8)
    ax.set_xlabel(f"site ({pattern})" if pattern else "site", fontsize=8)
    step = max(1, len(x) // 30)
    ax.set_xticks(x[::step])
    rot = 0 if all(len(t) <= 4 for t in labels) else 60
    ax.set_xticklabels(labels[::step], fontsize=7, rotation=rot, ha="right" if rot else "center")
    ax.set_title("key reads per layer against the original (grey: exact or skipped)", fontsize=9)
    ax.tick_params(labelsize=7)


def _panels(tables, sources, chosen, heads):
    panels = []
    for s in chosen:
        t, src = tables[s.site], sources[s.site]
        for h in heads:
            if h >= t.shape[0]:
                continue
            head = f"kv head {h}" if src == "recorded" else "every head"
            panels.append((f"{s.site}\n{head}, {src}", t[h]))
    return panels


def _plan_tile(rep: RewriteReport, chosen: list[SiteReport]) -> tuple[int, int]:
    """The tile the pictures' legend uses: the drawn sites' largest, else any rewritten
    site's, else the configured one (None in a default config: the tile follows the
    heads), else 64."""
    tiles = [s.plan.get("tile") for s in chosen or rep.rewritten
             if isinstance(s.plan.get("tile"), int)]
    configured = rep.config.get("tile")
    tile = max(tiles) if tiles else configured if isinstance(configured, int) else 64
    return tile, max(1, tile.bit_length() - 1)


def save_report(
    converted_or_report: nn.Module | RewriteReport,
    directory: str | os.PathLike,
    levels: dict | bool | None = None,
    *,
    calibration: Any = None,
    sites: Sequence[str | int] | None = None,
    heads: Sequence[int] = (0,),
    max_sites: int = 4,
) -> Path:
    """Write ``report.html`` with the report table, the plan per site and pictures.

    Args:
        converted_or_report: a model returned by `nanite_compile.convert`, or a
            `RewriteReport` (e.g. read back from JSON).
        directory: created if missing; the files in it are replaced.
        levels: ``None``: record the level tables from one forward of the
            converted model (``calibration``, or a Hugging Face model's synthetic
            probe) and rebuild the rest from the plans; a dict ``site -> table``
            (``[mq, mk]``, ``[Hkv, mq, mk]`` or ``[B, Hkv, mq, mk]``) to draw
            those; ``False``: no level pictures.
        calibration: token ids for the recording forward.
        sites: which sites to draw (names or indices into ``report.sites``);
            default: up to ``max_sites`` rewritten sites, first and last included.
        heads: which KV heads to draw for each site.

    Returns:
        The path of ``report.html``.

    Raises:
        ImportError: matplotlib is not installed (the message says ``pip install matplotlib``).
        ValueError: a requested site is unknown, or a level table has a bad shape.
    """
    Figure, FigureCanvasAgg, Patch = _matplotlib()
    from .api import report as _report

    if isinstance(converted_or_report, RewriteReport):
        rep, model = converted_or_report, None
    elif isinstance(converted_or_report, nn.Module):
        rep, model = _report(converted_or_report), converted_or_report
    else:
        raise TypeError(
            "save_report takes a converted model or a RewriteReport, got "
            f"{type(converted_or_report).__name__}"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    tables: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    if levels is not False:
        if isinstance(levels, dict):
            given = levels
        elif model is not None:
            given = record_levels(model, calibration)
        else:
            given = {}
        for site, t in given.items():
            tables[site] = _as_table(t)
            sources[site] = "recorded"
        for s in rep.rewritten:
            if s.site not in tables and not isinstance(levels, dict):
                t = plan_levels(s)
                if t is not None:
                    tables[s.site] = t
                    sources[s.site] = "from the plan, uniform keys"
    by_name = {s.site: s for s in rep.sites}
    if sites is None:
        chosen = _pick([s for s in rep.sites if s.site in tables], max_sites)
    else:
        chosen = []
        for key in sites:
            s = rep.sites[key] if isinstance(key, int) else by_name.get(key)
            if s is None:
                raise ValueError(f"unknown site {key!r}; the report has {sorted(by_name)}")
            if s.site in tables:
                chosen.append(s)
    heads = [int(h) for h in heads]
    if any(h < 0 for h in heads) or max_sites < 0:
        raise ValueError(f"heads are KV head indices and max_sites a count, 0 or more; got "
                         f"heads={heads}, max_sites={max_sites}")

    files: dict[str, str] = {}
    panels = _panels(tables, sources, chosen, heads) if chosen else []
    if chosen and heads and not panels:
        have = max(tables[s.site].shape[0] for s in chosen)
        raise ValueError(f"no KV head {heads} in the drawn sites, which have {have} KV "
                         f"head(s): pass heads from 0 to {have - 1}")
    tile, max_pool = _plan_tile(rep, chosen)
    ncol = min(4, len(panels)) if panels else 0
    nrow = -(-len(panels) // ncol) if panels else 0

    def render(fig, name):
        FigureCanvasAgg(fig).print_png(str(out / name))
        files[name] = name

    legend_w = 2.2  # inches of the legend column

    def level_grid(fig, grid, rows):
        axes = [fig.add_subplot(grid[i // ncol, i % ncol]) for i in range(len(panels))]
        _draw_levels(axes, fig.add_subplot(grid[:rows, ncol]), panels, tile, max_pool, Patch)

    if panels:
        w = 3.0 * ncol + legend_w
        fig = Figure(figsize=(w, 3.2 * nrow + 0.2), dpi=110)
        grid = fig.add_gridspec(nrow, ncol + 1, width_ratios=[3.0] * ncol + [legend_w])
        level_grid(fig, grid, nrow)
        fig.subplots_adjust(
            left=0.7 / w, right=0.99, wspace=0.45, hspace=0.55, top=0.88, bottom=0.12
        )
        render(fig, "levels.png")

    if rep.sites:
        width = max(7.0, min(16.0, 0.35 * len(rep.sites) + 3))
        fig = Figure(figsize=(width, 3.4), dpi=110)
        _draw_budget(fig.add_subplot(1, 1, 1), rep)
        fig.tight_layout()
        render(fig, "budget.png")

        # the one picture of the converted model: level tables above, budget chart below
        top = nrow if panels else 0
        w = max(width, 3.0 * ncol + legend_w)
        h = 3.2 * top + 3.8
        fig = Figure(figsize=(w, h), dpi=110)
        cols = ncol + 1 if panels else 1
        ratios = [3.0] * ncol + [legend_w] if panels else [1.0]
        grid = fig.add_gridspec(
            top + 1, cols, height_ratios=[3.2] * top + [3.0], width_ratios=ratios
        )
        if panels:
            level_grid(fig, grid, top)
        _draw_budget(fig.add_subplot(grid[top, :]), rep)
        fig.subplots_adjust(
            left=0.8 / w, right=0.98, hspace=0.7, wspace=0.45, top=1 - 1.0 / h, bottom=0.9 / h
        )
        fig.suptitle(f"nanite_compile: {rep.model}", fontsize=11)
        render(fig, "report.png")

    (out / "report.json").write_text(rep.to_json())
    path = out / "report.html"
    path.write_text(_html(rep, files, sources, chosen), encoding="utf-8")
    return path


# ------------------------------------------------------------------ HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.skipped td { color: #777; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

_PLAN_KEYS = ("tile", "window", "anchors", "horizon", "budget", "budget_reads", "state_features")


def _cell(x: Any, spec: str = "") -> str:
    if x is None:
        return "<td></td>"
    if isinstance(x, float) and spec:
        return f'<td class="num">{html.escape(format(x, spec))}</td>'
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f'<td class="num">{html.escape(str(x))}</td>'
    return f"<td>{html.escape(str(x))}</td>"


def _row(cells: list[str], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>{''.join(cells)}</tr>"


def _html(rep: RewriteReport, files: dict, sources: dict, chosen: list) -> str:
    e = html.escape
    sm = rep.summary()
    phrase = rep.flops_phrase(sm)
    ratio = phrase and f"; {phrase}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>nanite_compile report: {e(rep.model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>nanite_compile report: {e(rep.model)}</h1>",
        f"<p>{sm['sites']} attention sites, {sm['rewritten']} rewritten, "
        f"{sm['skipped']} skipped{e(ratio)}.</p>",
    ]
    if "report.png" in files:
        parts.append(
            '<p>All in one picture: <a href="report.png">report.png</a>; the data: '
            '<a href="report.json">report.json</a>.</p>'
        )

    parts.append("<h2>Attention sites</h2>")
    head = [
        "site",
        "pattern",
        "mask",
        "status",
        "ran",
        "reads/query",
        "original reads/query",
        "reads/orig",
    ]
    computed = any(s.computed_per_query is not None for s in rep.sites)
    head += ["computed/orig"] if computed else []
    head += ["rel. error", "reason"]
    rows = []
    for s in rep.sites:
        why = s.why_exact()
        rows.append(
            _row(
                [
                    _cell(s.site),
                    _cell(s.pattern),
                    _cell(s.runtime_mask or s.mask_kind),
                    _cell(s.status),
                    _cell(s.runtime_path),
                    _cell(s.reads_per_query, ".1f"),
                    _cell(s.exact_reads_per_query, ".1f"),
                    _cell(s.read_ratio, ".3f"),
                ]
                + ([_cell(s.work_ratio, ".3f")] if computed else [])
                + [
                    _cell(s.rel_error, ".2e"),
                    _cell(why),
                ],
                cls=f"site {s.status}",
            )
        )
    parts.append(_table("sites", head, rows))

    parts.append("<h2>Plan per site</h2>")
    rows = [
        _row([_cell(s.site)] + [_cell(s.plan.get(k)) for k in _PLAN_KEYS], cls="plan")
        for s in rep.rewritten
    ]
    parts.append(
        _table("plans", ["site", *_PLAN_KEYS], rows) if rows else "<p>No site was rewritten.</p>"
    )

    if "levels.png" in files:
        recorded = sorted({sources[s.site] for s in chosen})
        parts.append("<h2>Level tables</h2>")
        parts.append(
            "<p>Each picture is one site's level table for one KV head: query tiles down, key "
            "tiles across; colour is the level a query tile reads a key tile at: "
            "<b>EXACT</b> (all keys), <b>POOL r</b> (means over 2<sup>r</sup> keys; lighter is "
            "coarser), <b>STATE</b> (folded into the recurrent state), <b>NONE</b> (not seen). "
            f"Source: {e(', '.join(recorded))}.</p>"
        )
        parts.append('<img src="levels.png" alt="level tables of the chosen sites">')
    if "budget.png" in files:
        parts.append("<h2>Key reads per layer</h2>")
        parts.append('<img src="budget.png" alt="key reads per query against the original">')

    parts.append("<h2>Configuration</h2>")
    rows = [_row([_cell(k), _cell(v)]) for k, v in sorted(rep.config.items())]
    parts.append(_table("config", ["option", "value"], rows))
    if rep.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts.extend(f"<li>{e(n)}</li>" for n in rep.notes)
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(ident: str, head: list[str], rows: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        f'<table id="{ident}"><thead><tr>{th}</tr></thead><tbody>\n'
        + "\n".join(rows)
        + "\n</tbody></table>"
    )
