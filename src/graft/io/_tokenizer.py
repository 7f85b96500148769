"""Tokenizers in and out, for recipes that build the output vocabulary (``tokenizer:``) or
set a chat template. Loading and saving go through transformers (the ``hf`` extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from graft.io._errors import GraftIOError
from graft.io._sidecar import TOKENIZER_FILES, safe_source, write_text

# Files that hold a tokenizer's vocabulary; a folder with none of them has no tokenizer.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
MAX_CONFIG_BYTES = 16 << 20


def has_tokenizer(root: str | os.PathLike | None) -> bool:
    """True when the folder ``root`` holds tokenizer vocabulary files."""
    return root is not None and any((Path(root) / f).is_file() for f in _VOCAB_FILES)


def load_tokenizer(root: str | os.PathLike):
    """The fast transformers tokenizer saved in ``root`` (``AutoTokenizer``, local files
    only, no remote code).

    Raises:
        GraftIOError: transformers is missing, or the tokenizer cannot be loaded.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise GraftIOError(
            "building the output tokenizer needs transformers: pip install 'graft[hf]'"
        ) from e
    try:
        return AutoTokenizer.from_pretrained(str(root), use_fast=True, local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise GraftIOError(f"cannot load the tokenizer in {root}: {reason}") from None


def save_tokenizer(tokenizer, dst: str | os.PathLike) -> list[str]:
    """Write ``tokenizer`` into the output folder ``dst`` (``save_pretrained``), replacing
    any tokenizer files already copied there.

    Returns:
        The names of the files written.
    """
    out = Path(dst)
    for name in (*TOKENIZER_FILES, *_TEMPLATE_FILES):
        (out / name).unlink(missing_ok=True)
    try:
        files = tokenizer.save_pretrained(str(out))
    except OSError as e:
        raise GraftIOError(f"cannot write the tokenizer into {out}: {e.strerror or e}") from e
    return sorted({Path(f).name for f in files if Path(f).exists()})


def read_chat_template(root: str | os.PathLike | None) -> str | None:
    """The chat template a model folder's tokenizer carries, as transformers loads it:
    ``chat_template.jinja`` first, else ``tokenizer_config.json``'s ``chat_template``
    (a list of named templates gives the one named ``default``). None when there is none.
    """
    if root is None:
        return None
    folder = Path(root)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and (real := safe_source(folder, jinja)) is not None:
        return _read_small(real)
    config = _read_config(folder)
    template = (config or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def write_chat_template(dst: str | os.PathLike, template: str) -> bool:
    """Set the chat template of the tokenizer in output folder ``dst``: written into its
    ``tokenizer_config.json`` (as mergekit's tokenizers save it), any separate template
    file removed so that transformers reads this one.

    Returns:
        False when ``dst`` has no ``tokenizer_config.json`` (nothing is written).
    """
    folder = Path(dst)
    config = _read_config(folder)
    if config is None:
        return False
    config["chat_template"] = template
    for name in _TEMPLATE_FILES:
        (folder / name).unlink(missing_ok=True)
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return True


def _read_config(folder: Path) -> dict | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file() or (real := safe_source(folder, path)) is None:
        return None
    try:
        doc = json.loads(_read_small(real))
    except (ValueError, RecursionError) as e:
        raise GraftIOError(f"cannot parse {path}: {str(e)[:120]}; fix or remove it") from None
    if not isinstance(doc, dict):
        raise GraftIOError(f"{path} is not a JSON object; fix or remove it")
    return doc


def _read_small(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise GraftIOError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraftIOError(f"cannot read {path}: {e}") from None
