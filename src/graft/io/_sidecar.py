"""The files that travel with the weights: config, generation config, tokenizer, model card."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from graft.io._atomic import _umask
from graft.io._errors import GraftIOError, is_no_space, no_space_error

Warn = Callable[[str], None]

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
    src_root: str | os.PathLike | None,
    dst: str | os.PathLike,
    *,
    config: dict | None,
    warn: Warn | None = None,
    modules_root: str | os.PathLike | None = None,
) -> list[str]:
    """Write ``config.json`` and copy generation config, tokenizer files and a
    sentence-transformers folder's own files (`copy_sentence_transformers_files`) into `dst`.

    Only regular files inside `src_root` are copied (`safe_source`): a side file that is a
    symlink out of the model folder is skipped with a warning, so no file from elsewhere
    on the machine can end up in an output. When the source's own ``config.json`` is such
    a symlink, no config is written either (its contents came from outside).

    Args:
        src_root: the source model dir, or None when there is none (a bare file).
        dst: the output dir.
        config: the config to write (the caller may have edited it); None writes none.
        warn: called with one line per skipped file (default: `warnings.warn`).
        modules_root: the sentence-transformers folder around `src_root` when the weights
            sit in a module subfolder (the older ``0_Transformer/`` layout,
            `Checkpoint.modules_root`); its modules are copied instead of `src_root`'s.

    Returns:
        The names of the files written, in order. Missing optional files are skipped.
    """
    dst = Path(dst)
    warn = warn or _warn
    written = []
    src = Path(src_root) if src_root is not None else None
    own = src / "config.json" if src is not None else None
    if config is not None and own is not None and own.exists() and not safe_source(src, own, warn):
        config = None
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        written.append("config.json")
    if src is not None:
        written += _copy_present(src, dst, ("generation_config.json", *TOKENIZER_FILES), warn)
        written += copy_sentence_transformers_files(modules_root or src, dst, warn=warn)
    return written


def copy_tokenizer(
    src_root: str | os.PathLike, dst: str | os.PathLike, *, warn: Warn | None = None
) -> list[str]:
    """Copy the tokenizer files of `src_root` into `dst` (for a recipe's tokenizer_source).

    Returns:
        The names of the files copied (symlinks out of `src_root` are skipped, as in
        `copy_sidecar_files`).

    Raises:
        GraftIOError: `src_root` is not a directory or holds no tokenizer file.
    """
    src = Path(src_root)
    if not src.is_dir():
        raise GraftIOError(f"tokenizer source {src} is not a directory; pass a model directory")
    copied = _copy_present(src, Path(dst), TOKENIZER_FILES, warn or _warn)
    if not copied:
        raise GraftIOError(
            f"no tokenizer files in {src} (expected e.g. tokenizer.json or tokenizer.model); "
            "point tokenizer_source at a model directory with a tokenizer"
        )
    return copied


ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(
    src_root: str | os.PathLike, dst: str | os.PathLike, *, warn: Warn | None = None
) -> list[str]:
    """Copy a sentence-transformers folder's own files into ``dst``: ``modules.json``, its
    configs, and every module folder ``modules.json`` names besides the transformer's (e.g.
    ``1_Pooling``, ``2_Normalize``), so ``SentenceTransformer(dst)`` pools and normalises
    as the source did. Only regular files inside ``src_root`` or in a Hugging Face cache's
    blobs are copied (`safe_source`); others are skipped with a warning.

    Returns:
        The relative paths copied (empty for a plain transformers folder).

    Raises:
        GraftIOError: ``modules.json`` is malformed or names a path outside the folder.
    """
    src, out = Path(src_root), Path(dst)
    warn = warn or _warn
    modules = src / "modules.json"
    if not modules.is_file() or safe_source(src, modules, warn) is None:
        return []
    try:
        doc = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise GraftIOError(f"cannot parse {modules}: {str(e)[:120]}; fix or remove it") from None
    if not isinstance(doc, list):
        raise GraftIOError(f"{modules} is not a list of modules; fix or remove it")
    copied = _copy_present(src, out, ST_FILES[1:], warn)
    # graft writes the transformer's own files at the top of every output, so the
    # Transformer module's path becomes "" (the older layout kept it in 0_Transformer/).
    flat, moved = [], None
    for entry in doc:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Transformer"):
            moved = moved or (entry.get("path") or None)
            entry = {**entry, "path": ""}
        flat.append(entry)
    (out / "modules.json").write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")
    copied.insert(0, "modules.json")
    if isinstance(moved, str) and "sentence_bert_config.json" not in copied:
        inner = src / moved / "sentence_bert_config.json"
        real = safe_source(src, inner, warn) if inner.is_file() else None
        if real is not None:
            _copy(real, out / "sentence_bert_config.json", inner)
            copied.append("sentence_bert_config.json")
    real_src = src.resolve()
    for entry in doc:
        sub = entry.get("path") if isinstance(entry, dict) else None
        if (
            not isinstance(sub, str)
            or not sub
            or str(entry.get("type", "")).endswith("Transformer")
        ):
            continue
        folder = (src / sub).resolve()
        if not folder.is_relative_to(real_src) or folder == real_src:
            raise GraftIOError(f"{modules} names module path {sub!r} outside {src}; fix it")
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(src / sub):  # never into symlinked dirs
            dirnames.sort()
            for name in sorted(filenames):
                f = Path(dirpath) / name
                real = safe_source(src, f, warn)
                if real is None:
                    continue
                rel = f.relative_to(src / sub)
                (out / sub / rel).parent.mkdir(parents=True, exist_ok=True)
                _copy(real, out / sub / rel, f)
                copied.append(f"{sub}/{rel}")
    return copied


def safe_source(root: Path, path: Path, warn: Warn | None = None) -> Path | None:
    """Where ``path`` really is, when graft may copy it out of model folder ``root``: a
    regular file that resolves inside ``root``, or a blob of a Hugging Face hub cache
    (``models--org--name/blobs/HASH``): the files of a cache snapshot are symlinks into
    its ``../../blobs/``, and ``--local-dir`` downloads of huggingface_hub < 0.23 link
    their large files there. Anything else (a symlink elsewhere, a FIFO, a device) gives
    None, and ``warn`` is told about symlinks.
    """
    try:
        real = path.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except (OSError, RuntimeError):  # dangling link, a loop
        regular, real = False, None
    if regular and (real.is_relative_to(root.resolve()) or _is_hub_blob(real)):
        return real
    if path.is_symlink() and warn is not None:
        warn(
            f"skipped {path}: it links to {os.readlink(path)}, outside the model folder "
            f"{root}; graft copies only files inside it (copy the file in yourself if you "
            "trust it)"
        )
    return None


def _is_hub_blob(real: Path) -> bool:
    repo = real.parent.parent
    return real.parent.name == "blobs" and repo.name.startswith(("models--", "datasets--"))


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _copy_present(src: Path, dst: Path, names: Sequence[str], warn: Warn) -> list[str]:
    copied = []
    for name in names:
        if not (src / name).exists() and not (src / name).is_symlink():
            continue
        real = safe_source(src, src / name, warn)
        if real is not None:
            _copy(real, dst / name, src / name)
            copied.append(name)
    return copied


def _copy(real: Path, dst: Path, shown: Path) -> None:
    try:
        shutil.copyfile(real, dst)
    except OSError as e:
        if is_no_space(e):
            raise no_space_error(dst) from e
        raise GraftIOError(f"cannot copy {shown}: {e.strerror}") from e


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
    """Write a small text file (JSON, markdown, YAML) atomically: a temp file beside it,
    then a rename; on any failure the temp file is removed and the old file stays.

    Raises:
        GraftIOError: the file cannot be written (the disk is full, no permission).
    """
    dst = Path(path)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.graft-tmp-", dir=dst.parent)
    except OSError as e:
        raise _write_error(e, dst) from e
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f.fileno(), text.encode("utf-8"))
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, dst)
    except BaseException as e:
        Path(name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(e, dst) from e
        raise
    return dst


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_error(e: OSError, dst: Path) -> GraftIOError:
    if is_no_space(e):
        return no_space_error(dst)
    return GraftIOError(f"cannot write {dst}: {e.strerror or e}; check the path")
