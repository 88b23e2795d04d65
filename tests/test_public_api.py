"""The public surface of nanite_compile is pinned: changing it is a deliberate act."""

from __future__ import annotations

import inspect

import nanite_compile

PUBLIC = [
    "convert",
    "report",
    "save",
    "load",
    "NaniteConfig",
    "NaniteCache",
    "generate",
    "NaniteLoadError",
    "RewriteReport",
    "SiteReport",
]


def test_all_is_pinned():
    assert sorted(nanite_compile.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(nanite_compile, name) is not None, name
    assert isinstance(nanite_compile.__version__, str)


def test_convert_signature():
    params = inspect.signature(nanite_compile.convert).parameters
    assert list(params) == ["model", "budget", "calibration", "config"]
    assert params["model"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in ("budget", "calibration", "config"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert params["calibration"].default is None and params["config"].default is None
    assert nanite_compile.NaniteConfig().budget == 0.25  # the default budget


def test_report_signature():
    assert list(inspect.signature(nanite_compile.report).parameters) == ["model"]


def test_save_load_signatures():
    params = inspect.signature(nanite_compile.save).parameters
    assert list(params)[:2] == ["converted", "directory"]
    params = inspect.signature(nanite_compile.load).parameters
    assert list(params)[:2] == ["directory", "model"]
    assert params["calibration"].kind is inspect.Parameter.KEYWORD_ONLY
    assert issubclass(nanite_compile.NaniteLoadError, ValueError)


def test_public_names_are_documented():
    for name in PUBLIC:
        assert inspect.getdoc(getattr(nanite_compile, name)), f"{name} has no docstring"
