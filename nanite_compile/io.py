"""Save a converted model's plan and load it back onto a model: JSON and safetensors only.

    nanite_compile.save(converted, "out/")        # out/nanite.json, out/nanite.safetensors
    converted = nanite_compile.load("out/", model)

``nanite.json`` holds the format version, the `NaniteConfig`, the plan of
every attention site, the rewrite report and a fingerprint of the model
(class, parameter names, shapes and dtypes), with a sha256 of each part.
``nanite.safetensors`` holds the learned tensors (none in this version: the
file is valid and empty; tensors a later version registers in the converted
model's ``_nanite_state.learned`` dict go there and come back into it).

Nothing is ever unpickled or executed: the JSON is parsed with :mod:`json`,
the tensors file is checked byte by byte against the safetensors layout before
:mod:`safetensors` reads it, and a pickle or ``torch.save`` archive put in its
place is refused. Every refusal is a `NaniteLoadError` naming the problem and
the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import NaniteConfig
from .report import RewriteReport

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "JSON_NAME",
    "TENSORS_NAME",
    "NaniteLoadError",
    "SavedNanite",
    "load",
    "model_fingerprint",
    "read_saved",
    "save",
]

FORMAT = "nanite_compile"
FORMAT_VERSION = 1
JSON_NAME = "nanite.json"
TENSORS_NAME = "nanite.safetensors"

_MAX_JSON_BYTES = 256 * 2**20
_MAX_HEADER_BYTES = 100 * 2**20
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_RESAVE = "re-save it with nanite_compile.save(converted, directory)"


class NaniteLoadError(ValueError):
    """Saved nanite files that are missing, damaged, edited, pickled or for another model."""


@dataclass
class SavedNanite:
    """The checked contents of a save directory (no model involved yet).

    Attributes:
        directory: where it was read from.
        config: the saved configuration.
        plans: site name -> plan dict, for every rewritten site.
        report: the saved rewrite report.
        fingerprint: ``{"class": ..., "parameters": [[name, shape, dtype], ...]}``.
        tensors: the learned tensors (empty in this version).
        meta: the rest of the header (library and torch versions, source).
    """

    directory: Path
    config: NaniteConfig
    plans: dict
    report: RewriteReport
    fingerprint: dict
    tensors: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- hashing


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plan_hash(config: dict, plans: dict) -> str:
    return _sha256(_canonical({"config": config, "plans": plans}))


def model_fingerprint(model: nn.Module) -> dict:
    """Class and parameter names, shapes and dtypes of ``model``, with their sha256."""
    cls = type(model)
    params = [
        [name, list(p.shape), str(p.dtype).removeprefix("torch.")]
        for name, p in model.named_parameters()
    ]
    body = {"class": f"{cls.__module__}.{cls.__qualname__}", "parameters": params}
    return {**body, "sha256": _sha256(_canonical(body))}


# ---------------------------------------------------------------- save


def _state_of(converted: nn.Module):
    if not isinstance(converted, nn.Module):
        raise TypeError(
            f"save() takes a model returned by nanite_compile.convert, got {type(converted).__name__}"
        )
    state = converted.__dict__.get("_nanite_state")
    if state is None:
        raise ValueError(
            f"{type(converted).__name__} was not converted by nanite_compile.convert; "
            "call converted = nanite_compile.convert(model, ...) first, then save(converted, dir)"
        )
    return state


def learned_tensors(converted: nn.Module) -> dict[str, torch.Tensor]:
    """The learned tensors of a converted model (``_nanite_state.learned``; none yet)."""
    learned = getattr(_state_of(converted), "learned", None) or {}
    out = {}
    for name, t in learned.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"learned tensors must be str -> Tensor, got {name!r}: {type(t)}")
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(converted: nn.Module, directory: str | os.PathLike, *, source: str | None = None) -> Path:
    """Write ``converted``'s configuration, plans, report and learned tensors to ``directory``.

    Args:
        converted: a model returned by `nanite_compile.convert`.
        directory: created if missing; ``nanite.json`` and ``nanite.safetensors``
            in it are replaced.
        source: where the model came from (e.g. its Hugging Face directory),
            kept in the header for people reading it.

    Returns:
        The path of ``nanite.json``.

    Raises:
        TypeError, ValueError: ``converted`` is not a converted model.
        FileExistsError: ``directory`` is an existing file.
    """
    from safetensors.torch import save as st_save

    from . import __version__
    from .api import report as _report

    state = _state_of(converted)
    rep = _report(converted)
    config = state.config.to_dict()
    plans = {s.site: s.plan for s in rep.sites if s.status == "rewritten"}
    report_dict = json.loads(rep.to_json())
    fingerprint = model_fingerprint(converted)
    tensors = learned_tensors(converted)
    blob = st_save(tensors, metadata={"format": "pt", "nanite_format_version": str(FORMAT_VERSION)})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nanite_compile_version": __version__,
        "torch_version": torch.__version__,
        "source": source,
        "pending": bool(state.pending),
        "config": config,
        "plans": plans,
        "report": report_dict,
        "model": fingerprint,
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in tensors.items()
        },
        "sha256": {
            "plan": _plan_hash(config, plans),
            "report": _sha256(_canonical(report_dict)),
            "tensors_file": _sha256(blob),
        },
    }
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; save writes a directory ({JSON_NAME} and "
                              f"{TENSORS_NAME}): pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / TENSORS_NAME, blob)
    path = out / JSON_NAME
    _write_atomic(path, (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())
    return path


# ---------------------------------------------------------------- read and check


def _sniff(data: bytes) -> str | None:
    """What a file that should be JSON or safetensors looks like instead, if recognisable."""
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        return "a Python pickle"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save writes these; they hold pickles)"
    return None


def _read_bytes(path: Path, what: str, limit: int) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NaniteLoadError(
            f"{path} is missing; {what}: save a converted model there with "
            "nanite_compile.save(converted, directory)"
        ) from None
    if size > limit:
        raise NaniteLoadError(f"{path} is {size} bytes, too large for {what}; {_RESAVE}")
    return path.read_bytes()


def _check_pickle_stand_ins(directory: Path) -> None:
    for suffix in _PICKLE_SUFFIXES:
        p = directory / f"nanite{suffix}"
        if p.exists():
            raise NaniteLoadError(
                f"{p} found where {TENSORS_NAME} was expected: nanite_compile never loads "
                f"pickle or torch.save files; {_RESAVE}"
            )


def _parse_json(path: Path) -> dict:
    data = _read_bytes(path, "the nanite header", _MAX_JSON_BYTES)
    kind = _sniff(data)
    if kind:
        raise NaniteLoadError(
            f"{path} is {kind}, not JSON: nanite_compile never unpickles anything; {_RESAVE}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NaniteLoadError(f"{path} is not UTF-8 text (damaged?); {_RESAVE}") from None
    try:
        header = json.loads(text)
    except RecursionError:
        raise NaniteLoadError(
            f"{path} is not a nanite header (JSON nested too deeply); {_RESAVE}"
        ) from None
    except json.JSONDecodeError as e:
        where = "it ends early (truncated)" if e.pos >= len(text.rstrip()) else f"at {e.msg}"
        raise NaniteLoadError(
            f"{path} is not valid JSON ({where}, line {e.lineno} column {e.colno}); "
            f"the file is damaged or truncated: {_RESAVE}"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise NaniteLoadError(
            f'{path} is not a nanite_compile save file (no "format": "{FORMAT}"); '
            "point load() at a directory written by nanite_compile.save"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise NaniteLoadError(f"{path} has no integer format_version; {_RESAVE}")
    if version > FORMAT_VERSION:
        raise NaniteLoadError(
            f"{path} has format version {version}, newer than this nanite_compile reads "
            f"({FORMAT_VERSION}); upgrade nanite_compile (pip install -U nanite-compile)"
        )
    if version < FORMAT_VERSION:
        raise NaniteLoadError(
            f"{path} has format version {version}, older than {FORMAT_VERSION}: convert the "
            "model again with this version and save it"
        )
    types = {
        "config": dict,
        "plans": dict,
        "report": dict,
        "model": dict,
        "tensors": dict,
        "sha256": dict,
    }
    for key, typ in types.items():
        if not isinstance(header.get(key), typ):
            raise NaniteLoadError(f"{path} lacks a valid {key!r} entry (edited?); {_RESAVE}")
    for key in ("plan", "report", "tensors_file"):
        if not isinstance(header["sha256"].get(key), str):
            raise NaniteLoadError(f"{path} lacks the sha256 of its {key} (edited?); {_RESAVE}")
    return header


def _check_safetensors_layout(path: Path, data: bytes) -> None:
    kind = _sniff(data)
    if kind:
        raise NaniteLoadError(
            f"{path} is {kind}, not a safetensors file: nanite_compile never loads pickle; "
            f"{_RESAVE}"
        )
    if len(data) < 8:
        raise NaniteLoadError(f"{path} is truncated ({len(data)} bytes); {_RESAVE}")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > len(data):
        raise NaniteLoadError(
            f"{path} is not a valid safetensors file (header length {n} for a file of "
            f"{len(data)} bytes: truncated or damaged); {_RESAVE}"
        )
    try:
        meta = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NaniteLoadError(f"{path} has a damaged safetensors header; {_RESAVE}") from None
    if not isinstance(meta, dict):
        raise NaniteLoadError(f"{path} has a damaged safetensors header; {_RESAVE}")
    end = 0
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
        ):
            raise NaniteLoadError(f"{path}: tensor {name!r} has no valid offsets; {_RESAVE}")
        end = max(end, offs[1])
    if 8 + n + end != len(data):
        raise NaniteLoadError(
            f"{path} holds {len(data) - 8 - n} data bytes where its header describes {end} "
            f"(truncated or damaged); {_RESAVE}"
        )


def read_saved(directory: str | os.PathLike) -> SavedNanite:
    """Read and check a save directory without a model: format, hashes, tensor file.

    Raises:
        NaniteLoadError: a file is missing, damaged, truncated, edited or a pickle.
    """
    from safetensors.torch import load as st_load

    d = Path(directory)
    if not d.is_dir():
        raise NaniteLoadError(
            f"{d} is not a directory; give the directory nanite_compile.save wrote "
            f"({JSON_NAME} and {TENSORS_NAME})"
        )
    jpath, tpath = d / JSON_NAME, d / TENSORS_NAME
    header = _parse_json(jpath)
    sums = header["sha256"]
    if _plan_hash(header["config"], header["plans"]) != sums["plan"]:
        raise NaniteLoadError(
            f"{jpath}: the configuration or plans were edited (their sha256 does not match); "
            "change options by converting again (nanite_compile.convert(model, config=...)) "
            "and saving, not by editing the file"
        )
    if _sha256(_canonical(header["report"])) != sums["report"]:
        raise NaniteLoadError(f"{jpath}: the report was edited (sha256 mismatch); {_RESAVE}")
    fp = header["model"]
    body = {"class": fp.get("class"), "parameters": fp.get("parameters")}
    if not isinstance(body["parameters"], list) or _sha256(_canonical(body)) != fp.get("sha256"):
        raise NaniteLoadError(
            f"{jpath}: the model fingerprint was edited (sha256 mismatch); {_RESAVE}"
        )
    if not tpath.exists():
        _check_pickle_stand_ins(d)
    tdata = _read_bytes(tpath, "the learned tensors", 2**40)
    _check_safetensors_layout(tpath, tdata)
    if _sha256(tdata) != sums["tensors_file"]:
        raise NaniteLoadError(
            f"{tpath} does not belong to {jpath} (its sha256 differs: replaced or edited); "
            f"{_RESAVE}"
        )
    try:
        tensors = st_load(tdata)
    except Exception as e:  # the layout was checked; anything left is damage
        raise NaniteLoadError(f"{tpath} could not be read ({e}); {_RESAVE}") from None
    listed = header["tensors"]
    if sorted(listed) != sorted(tensors):
        raise NaniteLoadError(
            f"{tpath} holds tensors {sorted(tensors)}, {jpath} lists {sorted(listed)}; {_RESAVE}"
        )
    # a save from before max_level existed ran every pooled level: its config and its
    # plans say so explicitly from here on (the same outputs, and the plans the sites get
    # compare equal to the saved ones)
    # (and one from before select / row_tiles existed chose per query tile)
    old = {"max_level": None, "select": "row", "row_tiles": 1}
    options = {**old, **header["config"]}
    plans = {site: {**old, **plan} if isinstance(plan, dict) else plan
             for site, plan in header["plans"].items()}
    try:
        config = NaniteConfig.from_options(options)
    except (TypeError, ValueError) as e:
        raise NaniteLoadError(
            f"{jpath}: its configuration is not valid here ({e}); "
            "convert the model again with this version and save it"
        ) from None
    try:
        rep = RewriteReport.from_json(json.dumps(header["report"]))
    except (KeyError, TypeError, ValueError) as e:
        raise NaniteLoadError(f"{jpath}: its report cannot be read ({e}); {_RESAVE}") from None
    meta = {
        k: header.get(k)
        for k in ("format_version", "nanite_compile_version", "torch_version", "source", "pending")
    }
    return SavedNanite(
        directory=d,
        config=config,
        plans=plans,
        report=rep,
        fingerprint={"class": body["class"], "parameters": body["parameters"]},
        tensors=tensors,
        meta=meta,
    )


def _check_model(saved: SavedNanite, model: nn.Module) -> None:
    mine = model_fingerprint(model)
    where = saved.directory / JSON_NAME
    if mine["class"] != saved.fingerprint["class"]:
        raise NaniteLoadError(
            f"{where} was saved for a {saved.fingerprint['class']}, this model is a "
            f"{mine['class']}; load it onto the model it was converted from"
        )
    theirs = {p[0]: p for p in saved.fingerprint["parameters"]}
    ours = {p[0]: p for p in mine["parameters"]}
    missing = [n for n in theirs if n not in ours]
    extra = [n for n in ours if n not in theirs]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise NaniteLoadError(
            f"{where} was saved for another architecture: this model has parameters {what} "
            f"({len(ours)} parameters here, {len(theirs)} saved); load it onto the model it was "
            "converted from"
        )
    for name, (_, shape, dtype) in theirs.items():
        _, my_shape, my_dtype = ours[name]
        if list(shape) != my_shape:
            raise NaniteLoadError(
                f"{where} was saved for another model size: {name} is {tuple(my_shape)} here, "
                f"{tuple(shape)} saved; load it onto the model it was converted from"
            )
        if dtype != my_dtype:
            raise NaniteLoadError(
                f"{where} was saved for a {dtype} model, {name} is {my_dtype} here; load the "
                f"model in {dtype} (e.g. model.to(torch.{dtype})) before nanite_compile.load"
            )


def load(directory: str | os.PathLike, model: nn.Module, *, calibration: Any = None) -> nn.Module:
    """Convert ``model`` again exactly as the saved model was, after checking the files.

    Args:
        directory: written by `save`.
        model: the original (unconverted) model: same class, parameter names,
            shapes and dtypes as the one that was converted. Not modified.
        calibration: token ids for the probe run, as in `nanite_compile.convert`.

    Returns:
        ``convert(model, config=saved_config)``: on the same input its outputs
        equal the saved model's bit for bit.

    Raises:
        NaniteLoadError: the files are missing, damaged, truncated, edited,
            pickled, or belong to another model; or the model's attention
            sites no longer get the saved plans.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    from .api import _convert, report

    if not isinstance(model, nn.Module):
        raise TypeError(f"load() takes the original torch.nn.Module, got {type(model).__name__}")
    saved = read_saved(directory)
    if "_nanite_state" in model.__dict__:
        raise NaniteLoadError(
            "load() takes the original model, not a converted one; pass the model you "
            "gave nanite_compile.convert"
        )
    _check_model(saved, model)
    converted = _convert(model, config=saved.config, calibration=calibration, plans=saved.plans)
    state = converted.__dict__["_nanite_state"]
    if saved.tensors:
        state.learned = dict(saved.tensors)
    if not state.pending:
        plans = {s.site: s.plan for s in report(converted).sites if s.status == "rewritten"}
        if plans != saved.plans:
            raise NaniteLoadError(
                f"the model's attention sites got plans {_short(plans)}, the saved ones are "
                f"{_short(saved.plans)} (model code or nanite_compile version changed?); "
                "convert the model again and save it"
            )
    return converted


def _short(plans: dict) -> str:
    text = json.dumps(plans, sort_keys=True)
    return text if len(text) < 200 else text[:197] + "..."
