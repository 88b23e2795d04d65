"""The rewrite report: every attention site, what was done, why, at what cost and error.

Data (`SiteReport`, `RewriteReport`) is kept apart from its presentation
(`format_table`); the JSON form round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_REPORT_VERSION = 1


@dataclass
class SiteReport:
    """One attention site.

    Attributes:
        site: unique site name: the module path, with ``[i]`` when a module computes several.
        module_path: dotted path of the module that computes it.
        pattern: the pattern that matched (``sdpa``, ``aten_sdpa``, ``eager``, ...).
        mask_kind: what the graph says about the mask; ``runtime_mask`` what
            the mask turned out to be on the measured input.
        q_shape, k_shape: shapes in the captured graph (symbolic sizes as strings).
        status: ``rewritten`` or ``skipped``.
        reason: why it was skipped (empty when rewritten).
        plan: the tile parameters the site runs with.
        runtime_path: on the measured input, ``tiled`` or ``exact`` (and why, in ``runtime_reason``).
        reads_per_query, exact_reads_per_query: key reads per query, converted and original.
        computed_per_query: keys scored per query, where more than read: under
            ``select="query"`` a query tile computes the union of its queries'
            tiles and masks what each query does not read (None: as read).
        flops_before, flops_after: attention matmul FLOPs on the measured input
            (``flops_after`` counts what is computed, not only what is read).
        rel_error: relative L2 error of the site's output against exact attention
            on the measured input.
        exact_variants: for a rewritten site, why other compiled variants of its
            module (another call signature: ``output_attentions=True``, a graph break
            inside the attention) left it exact; those calls run the original
            attention.
    """

    site: str
    module_path: str
    pattern: str
    mask_kind: str
    q_shape: list | None
    k_shape: list | None
    status: str
    reason: str = ""
    plan: dict = field(default_factory=dict)
    runtime_path: str | None = None
    runtime_reason: str = ""
    runtime_mask: str = ""
    reads_per_query: float | None = None
    exact_reads_per_query: float | None = None
    computed_per_query: float | None = None
    flops_before: float | None = None
    flops_after: float | None = None
    rel_error: float | None = None
    measured_shape: list | None = None
    exact_variants: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def read_ratio(self) -> float | None:
        """Key reads per query against the original's (None when not measured)."""
        return self._share(self.reads_per_query)

    @property
    def work_ratio(self) -> float | None:
        """Keys scored per query against the original's: the reads, or what the site
        computes where that is more (``select="query"``)."""
        work = self.computed_per_query if self.computed_per_query is not None \
            else self.reads_per_query
        return self._share(work)

    def _share(self, x: float | None) -> float | None:
        return x / self.exact_reads_per_query if x is not None and self.exact_reads_per_query \
            else None

    @classmethod
    def from_dict(cls, d: dict) -> SiteReport:
        """A site from its ``to_dict`` form; every field's type is checked.

        Raises:
            TypeError: ``d`` is not a dict, or a field has the wrong type.
            ValueError: unknown or missing fields, or a status other than
                ``rewritten``/``skipped``.
        """
        if not isinstance(d, dict):
            raise TypeError(f"a site report must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown site report fields {sorted(map(str, unknown))}")
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # fmt: skip
        if missing:
            raise ValueError(f"site report lacks the fields {missing}")
        for name, value in d.items():
            _check_site_field(name, value)
        if d["status"] not in ("rewritten", "skipped"):
            raise ValueError(f"site status must be 'rewritten' or 'skipped', got {d['status']!r}")
        return cls(**d)

    def why_exact(self) -> str:
        """Why (some of) the site's calls run exact: the skip reason, the measured
        run's reason, or the call signatures compiled without the rewrite."""
        if self.status == "skipped":
            return self.reason
        parts = [self.runtime_reason] if self.runtime_path == "exact" else []
        if self.exact_variants:
            parts.append("exact on other calls: " + "; ".join(self.exact_variants))
        return "; ".join(parts)

    def absorb(self, records: list[dict]) -> None:
        """Fill the run-time columns from the op's records of one measured forward."""
        if not records:
            return
        rec = records[-1]
        self.runtime_path = rec.get("path")
        self.runtime_reason = rec.get("reason", "")
        self.runtime_mask = rec.get("mask", "")
        self.measured_shape = rec.get("q_shape")
        exact = rec.get("exact_reads_per_query")
        reads = rec.get("reads_per_query")
        computed = rec.get("computed_per_query")
        qs = rec.get("q_shape") or [1, 1, 1, 1]
        nq_total = qs[0] * qs[1] * qs[2]
        dim = qs[3]
        if self.runtime_path == "exact":
            reads = computed = exact
        if exact is not None:
            self.exact_reads_per_query = float(exact)
            self.flops_before = 4.0 * nq_total * dim * float(exact)
        if reads is not None:
            self.reads_per_query = float(reads)
            work = reads
            if computed is not None and float(computed) > float(reads):
                self.computed_per_query = float(computed)
                work = computed
            self.flops_after = 4.0 * nq_total * dim * float(work)
        if "rel_error" in rec:
            self.rel_error = float(rec["rel_error"])


def merge_sites(records: Iterable[SiteReport]) -> list[SiteReport]:
    """One entry per attention site from the records of every graph compiled for a model.

    Dynamo compiles a module once per call signature (prefill or decode, each set of
    keyword arguments), and a rewrite may hold in one graph and not in another
    (``output_attentions=True`` returns the attention weights; a graph break inside
    the attention leaves SDPA's dropout a run-time value). A site's entry is its
    first rewritten record, or its latest record where no graph rewrote it. A skipped
    record of a site rewritten elsewhere adds its reason to that entry's
    ``exact_variants`` instead of standing as a site of its own. A graph that Dynamo
    compiled from a frame of its own after a graph break names modules from that
    frame: ``model.layers.0`` for the attention inside it (a frame inside the module
    ``convert`` installed at), ``layers.0.self_attn`` for ``model.layers.0.self_attn``
    (a frame of ``model``); so a skipped record counts for every rewritten site whose
    module path holds its path as a run of whole components. Records are updated in
    place; the result keeps first-seen order.
    """
    records = list(records)
    order = list(dict.fromkeys(r.site for r in records))
    entry: dict[str, SiteReport] = {}
    for r in records:
        cur = entry.get(r.site)
        if cur is None or cur.status != "rewritten":
            entry[r.site] = r
    rewritten = [e for e in entry.values() if e.status == "rewritten"]
    for r in records:
        if r.status == "rewritten":
            continue
        targets = [e for e in rewritten if e.site == r.site or (
            r.module_path and f".{r.module_path}." in f".{e.module_path}.")]
        for t in targets:
            if r.reason not in t.exact_variants:
                t.exact_variants.append(r.reason)
        if targets and entry[r.site].status != "rewritten":
            del entry[r.site]
    return [entry[name] for name in order if name in entry]


@dataclass
class RewriteReport:
    """All attention sites of one converted model (or one torch.compile'd model)."""

    model: str
    config: dict
    sites: list[SiteReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def summary(self) -> dict:
        """Site counts and attention FLOPs before/after over the measured sites;
        ``unmeasured`` counts the sites left out of the ratio (a skipped site runs the
        original attention, which the probe does not time or count)."""
        before = sum(s.flops_before or 0.0 for s in self.sites)
        after = sum(s.flops_after or 0.0 for s in self.sites)
        return {
            "sites": len(self.sites),
            "rewritten": len(self.rewritten),
            "skipped": len(self.skipped),
            "attention_flops_before": before,
            "attention_flops_after": after,
            "flops_ratio": (after / before) if before else None,
            "unmeasured": sum(s.flops_before is None for s in self.sites),
        }

    def flops_phrase(self, summary: dict | None = None) -> str:
        """The summary's FLOPs ratio in words ('' when nothing was measured);
        ``summary``: this report's `summary`, when the caller has it."""
        sm = summary or self.summary()
        if sm["flops_ratio"] is None:
            return ""
        left = sm["unmeasured"]
        out = f"attention FLOPs x{sm['flops_ratio']:.3f}"
        return out + (f" of the {sm['sites'] - left} measured site(s) ({left} unmeasured, "
                      "not counted)" if left else "")

    def to_dict(self) -> dict:
        return {
            "version": _REPORT_VERSION,
            "model": self.model,
            "config": self.config,
            "sites": [s.to_dict() for s in self.sites],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RewriteReport:
        """Read what `to_json` wrote.

        Raises:
            ValueError: not JSON, not a report of this version, missing entries.
            TypeError: an entry of the wrong type.
        """
        data = _loads(text, "a nanite_compile report")
        if not isinstance(data, dict) or data.get("version") != _REPORT_VERSION:
            raise ValueError(
                f"not a nanite_compile report (version {_REPORT_VERSION} expected); "
                "write it with RewriteReport.to_json()"
            )
        missing = [k for k in ("model", "config", "sites") if k not in data]
        if missing:
            raise ValueError(f"the report lacks {missing}; write it with RewriteReport.to_json()")
        model, config, sites = data["model"], data["config"], data["sites"]
        notes = data.get("notes", [])
        if not isinstance(model, str):
            raise TypeError(f"report 'model' must be a string, got {type(model).__name__}")
        if not isinstance(config, dict):
            raise TypeError(f"report 'config' must be an object, got {type(config).__name__}")
        if not isinstance(sites, list):
            raise TypeError(f"report 'sites' must be a list, got {type(sites).__name__}")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise TypeError("report 'notes' must be a list of strings")
        return cls(
            model=model,
            config=dict(config),
            sites=[SiteReport.from_dict(s) for s in sites],
            notes=list(notes),
        )

    def __str__(self) -> str:
        return format_table(self)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"RewriteReport(model={self.model!r}, sites={s['sites']}, "
                f"rewritten={s['rewritten']}, skipped={s['skipped']})")


def _loads(text: Any, what: str) -> Any:
    """``json.loads`` whose failures are all ValueError/TypeError with a message."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"not {what}: JSON nested too deeply") from None


_STR_FIELDS = {"site", "module_path", "pattern", "mask_kind", "status", "reason",
               "runtime_reason", "runtime_mask"}  # fmt: skip
_OPT_STR_FIELDS = {"runtime_path"}
_SHAPE_FIELDS = {"q_shape", "k_shape", "measured_shape"}
_STR_LIST_FIELDS = {"exact_variants"}
_NUMBER_FIELDS = {"reads_per_query", "exact_reads_per_query", "computed_per_query",
                  "flops_before", "flops_after", "rel_error"}  # fmt: skip


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_site_field(name: str, value: Any) -> None:
    if name in _STR_FIELDS:
        ok = isinstance(value, str)
        want = "a string"
    elif name in _OPT_STR_FIELDS:
        ok = value is None or isinstance(value, str)
        want = "a string or null"
    elif name in _SHAPE_FIELDS:
        ok = value is None or (
            isinstance(value, list)
            and all(
                isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))
                for x in value
            )
        )
        want = "a list of sizes (ints, or strings for symbolic sizes) or null"
    elif name in _NUMBER_FIELDS:
        ok = value is None or _is_number(value)
        want = "a number or null"
    elif name in _STR_LIST_FIELDS:
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        want = "a list of strings"
    else:  # plan
        ok = isinstance(value, dict)
        want = "an object"
    if not ok:
        raise TypeError(f"site report field {name!r} must be {want}, got {value!r:.80}")


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(rep: RewriteReport) -> str:
    """The report as a text table (tabulate) with a summary line."""
    from tabulate import tabulate

    # a "computed/orig" column only where some site computes more than it reads
    # (select="query": a query tile scores the union of its queries' tiles)
    computed = any(s.computed_per_query is not None for s in rep.sites)
    rows = []
    for s in rep.sites:
        why = s.why_exact()
        row = [s.module_path or "<root>", s.pattern, s.runtime_mask or s.mask_kind, s.status,
               s.runtime_path or "", _fmt(s.read_ratio, ".3f")]
        row += [_fmt(s.work_ratio, ".3f")] if computed else []
        rows.append(row + [_fmt(s.rel_error, ".2e"), why])
    headers = ["module", "pattern", "mask", "status", "ran", "reads/orig"]
    headers += ["computed/orig"] if computed else []
    table = tabulate(rows, headers=headers + ["rel. error", "reason"], tablefmt="simple")
    sm = rep.summary()
    phrase = rep.flops_phrase(sm)
    ratio = phrase and f", {phrase}"
    head = (f"nanite_compile report for {rep.model}: {sm['sites']} attention sites, "
            f"{sm['rewritten']} rewritten, {sm['skipped']} skipped{ratio}")
    notes = "".join(f"\nnote: {n}" for n in rep.notes)
    return f"{head}\n{table}{notes}"
