"""The files that travel with the weights: config, generation config, tokenizer, model card."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from graft.io._errors import GraftIOError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "chat_template.jinja",
)
# Values the Hugging Face Hub understands for `base_model_relation`.
_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def copy_sidecar_files(
    src_root: str | os.PathLike | None, dst: str | os.PathLike, *, config: dict | None
) -> list[str]:
    """Write ``config.json`` and copy generation config, tokenizer files and a
    sentence-transformers folder's own files (`copy_sentence_transformers_files`) into `dst`.

    Args:
        src_root: the source model dir, or None when there is none (a bare file).
        dst: the output dir.
        config: the config to write (the caller may have edited it); None writes none.

    Returns:
        The names of the files written, in order. Missing optional files are skipped.
    """
    dst = Path(dst)
    written = []
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        written.append("config.json")
    if src_root is not None:
        written += _copy_present(Path(src_root), dst, ("generation_config.json", *TOKENIZER_FILES))
        written += copy_sentence_transformers_files(src_root, dst)
    return written


def copy_tokenizer(src_root: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of `src_root` into `dst` (for a recipe's tokenizer_source).

    Returns:
        The names of the files copied.

    Raises:
        GraftIOError: `src_root` is not a directory or holds no tokenizer file.
    """
    src = Path(src_root)
    if not src.is_dir():
        raise GraftIOError(f"tokenizer source {src} is not a directory; pass a model directory")
    copied = _copy_present(src, Path(dst), TOKENIZER_FILES)
    if not copied:
        raise GraftIOError(
            f"no tokenizer files in {src} (expected e.g. tokenizer.json or tokenizer.model); "
            "point tokenizer_source at a model directory with a tokenizer"
        )
    return copied


ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(src_root: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy a sentence-transformers folder's own files into ``dst``: ``modules.json``, its
    configs, and every module folder ``modules.json`` names besides the transformer's (e.g.
    ``1_Pooling``, ``2_Normalize``), so ``SentenceTransformer(dst)`` pools and normalises
    as the source did. Only regular files inside ``src_root`` are copied.

    Returns:
        The relative paths copied (empty for a plain transformers folder).

    Raises:
        GraftIOError: ``modules.json`` is malformed or names a path outside the folder.
    """
    src, out = Path(src_root), Path(dst)
    modules = src / "modules.json"
    if not modules.is_file():
        return []
    try:
        doc = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise GraftIOError(f"cannot parse {modules}: {str(e)[:120]}; fix or remove it") from None
    if not isinstance(doc, list):
        raise GraftIOError(f"{modules} is not a list of modules; fix or remove it")
    copied = _copy_present(src, out, ST_FILES)
    real_src = src.resolve()
    for entry in doc:
        sub = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(sub, str) or not sub or str(entry.get("type", "")).endswith("Transformer"):
            continue
        folder = (src / sub).resolve()
        if not folder.is_relative_to(real_src) or folder == real_src:
            raise GraftIOError(f"{modules} names module path {sub!r} outside {src}; fix it")
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.is_symlink() and f.resolve().is_relative_to(real_src):
                rel = f.relative_to(src / sub)
                (out / sub / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(f, out / sub / rel)
                except OSError as e:
                    raise GraftIOError(f"cannot copy {f}: {e.strerror}") from e
                copied.append(f"{sub}/{rel}")
    return copied


def _copy_present(src: Path, dst: Path, names: Sequence[str]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            try:
                shutil.copyfile(src / name, dst / name)
            except OSError as e:
                raise GraftIOError(f"cannot copy {src / name}: {e.strerror}") from e
            copied.append(name)
    return copied


def recipe_hash(text: str) -> str:
    """A short, stable fingerprint of a recipe: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_model_card(
    dst: str | os.PathLike,
    *,
    base_models: Sequence[str],
    relation: str = "merge",
    tags: Sequence[str] = ("graft", "merge"),
    recipe_yaml: str,
    extra_md: str = "",
    title: str | None = None,
) -> Path:
    """Write ``README.md`` with Hub front matter (base_model, relation, tags) and the recipe.

    Args:
        dst: the output dir.
        base_models: Hub ids or paths of the models it was made from.
        relation: the Hub's ``base_model_relation``: merge, adapter, quantized or finetune.
        tags: Hub tags.
        recipe_yaml: the recipe text, shown verbatim and fingerprinted.
        extra_md: Markdown appended to the body.
        title: the heading; defaults to ``graft <relation> of <model names>``.

    Returns:
        The path of the card.

    Raises:
        ValueError: `relation` is not one the Hub understands.
    """
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(_RELATIONS)}, got {relation!r}")
    front = {
        "base_model": list(base_models),
        "base_model_relation": relation,
        "library_name": "transformers",
        "tags": list(tags),
    }
    models = "\n".join(f"- {m}" for m in base_models)
    if title is None:
        title = f"graft {relation} of {', '.join(Path(m).name for m in base_models)}"
    # A fence longer than any backtick run inside the recipe cannot be closed by it.
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", recipe_yaml)), default=0))
    card = (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {title}\n\n"
        f"Made with graft ({relation}) from:\n\n{models}\n\n"
        f"## Recipe\n\n{fence}yaml\n{recipe_yaml.rstrip()}\n{fence}\n\n"
        f"Recipe hash: `{recipe_hash(recipe_yaml)}`\n"
    )
    if extra_md:
        card += f"\n{extra_md.rstrip()}\n"
    path = Path(dst) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON, markdown, YAML) atomically: temp file, then rename."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.graft-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, dst)
    return dst
