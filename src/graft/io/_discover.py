"""Finding checkpoints on disk for the zoo index: model folders and loose weight files under
a path, the Hugging Face hub cache (through ``huggingface_hub``'s cache scan), and file
stats for change detection. (Model cards: `graft.io.read_model_card`.)"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from graft.io._checkpoint import (
    _PT_INDEX,
    _PT_SINGLE,
    _ST_INDEX,
    _ST_SINGLE,
    _TORCH_SUFFIXES,
    transformer_module_dir,
)
from graft.io._errors import GraftIOError

WEIGHT_SUFFIXES = (".safetensors", *_TORCH_SUFFIXES)
_MODEL_FILES = (_ST_INDEX, _ST_SINGLE, _PT_INDEX, _PT_SINGLE)
# Files whose size or mtime changing means a model must be read again.
_TRACKED_SUFFIXES = (*WEIGHT_SUFFIXES, ".json")
_CARD = "README.md"


def is_model_dir(path: Path) -> bool:
    """True when ``path`` is a folder that `open_checkpoint` reads as one model (including
    a sentence-transformers folder whose weights are in its ``0_Transformer/`` module)."""
    if not path.is_dir():
        return False
    if _has_model_files(path):
        return True
    module = _module_dir(path)
    return module is not None and _has_model_files(module)


def _has_model_files(path: Path) -> bool:
    return any((path / f).is_file() for f in _MODEL_FILES)


def _module_dir(path: Path) -> Path | None:
    """`transformer_module_dir`, None for a malformed ``modules.json`` (the scan then looks
    inside the folder, and opening it reports the problem)."""
    try:
        return transformer_module_dir(path)
    except GraftIOError:
        return None


def is_hf_cache(path: Path) -> bool:
    """True when ``path`` looks like a Hugging Face hub cache (``models--org--name`` folders)."""
    return path.is_dir() and any(
        p.name.startswith("models--") and p.is_dir() for p in path.iterdir()
    )


def discover_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Every checkpoint at or under ``path``, sorted.

    A model folder (``model.safetensors``, a sharded index, ``pytorch_model.bin``...) counts
    as one checkpoint and is not searched further; elsewhere each loose ``.safetensors``,
    ``.bin``, ``.pt`` or ``.pth`` file counts. Hidden folders and PEFT adapter folders
    (``adapter_config.json``) are skipped; symlinked folders are not followed; only
    regular files (or links to them) count, never pipes, sockets or devices.

    Raises:
        GraftIOError: ``path`` does not exist or is a file that is not a checkpoint.
    """
    root = Path(path)
    if not root.exists():
        raise GraftIOError(f"no such file or directory: {root}")
    if root.is_file():
        if root.suffix not in WEIGHT_SUFFIXES:
            raise GraftIOError(
                f"{root} is not a checkpoint; pass a model folder, a folder of models or a "
                f"{', '.join(WEIGHT_SUFFIXES)} file"
            )
        return [root]
    found: list[Path] = []
    for here, dirs, files in os.walk(root, onerror=None, followlinks=False):
        d = Path(here)
        if is_model_dir(d):
            found.append(d)
            dirs[:] = []
            continue
        if (d / "adapter_config.json").is_file():
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [
            d / f
            for f in files
            if f.endswith(WEIGHT_SUFFIXES) and not f.startswith(".") and (d / f).is_file()
        ]
    return sorted(found)


def file_stats(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of the files that make up a checkpoint, sorted by name.

    For a folder: its weight files, JSON files (config, index) and ``README.md``; for a
    file: the file. Symlinks (the HF cache's) are followed to their blobs. Used to skip
    re-reading a model whose files did not change.

    Raises:
        GraftIOError: the path cannot be listed.
    """
    p = Path(path)
    try:
        if p.is_file():
            st = p.stat()
            return [(p.name, st.st_size, st.st_mtime_ns)]
        folders = [p]
        if not _has_model_files(p) and (module := _module_dir(p)) is not None:
            folders.append(module)  # the older sentence-transformers layout
        out = []
        for folder in folders:
            for f in sorted(folder.iterdir()):
                if (f.name == _CARD or f.suffix in _TRACKED_SUFFIXES) and f.is_file():
                    st = f.stat()
                    out.append((str(f.relative_to(p)), st.st_size, st.st_mtime_ns))
        return sorted(out)
    except OSError as e:
        raise GraftIOError(f"cannot list {p}: {e.strerror}; check the path and permissions") from e


@dataclass(frozen=True)
class CachedSnapshot:
    """One revision of a model repo in the Hugging Face hub cache."""

    repo_id: str
    revision: str
    refs: tuple[str, ...]
    path: Path


def scan_hf_cache(
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, list[CachedSnapshot], list[str]]:
    """The model snapshots in a Hugging Face hub cache, read with ``huggingface_hub``.

    Args:
        cache_dir: the hub cache folder; default ``$HF_HUB_CACHE``, else huggingface_hub's
            own default (``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).

    Returns:
        ``(cache folder, snapshots sorted by repo and revision, warnings)``; warnings name
        the cache entries huggingface_hub found corrupted (they are left out).

    Raises:
        GraftIOError: huggingface_hub is not installed, or there is no cache there.
    """
    try:
        from huggingface_hub import constants, scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError as e:
        raise GraftIOError(
            "reading the Hugging Face cache needs huggingface_hub: pip install 'graft[hf]'"
        ) from e
    where = Path(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    try:
        info = scan_cache_dir(where)
    except CacheNotFound as e:
        raise GraftIOError(
            f"no Hugging Face cache at {e.cache_dir}; set HF_HUB_CACHE or pass the cache folder"
        ) from e
    snaps = [
        CachedSnapshot(
            repo.repo_id, rev.commit_hash, tuple(sorted(rev.refs)), Path(rev.snapshot_path)
        )
        for repo in info.repos
        if repo.repo_type == "model"
        for rev in repo.revisions
    ]
    snaps.sort(key=lambda s: (s.repo_id, s.revision))
    return where, snaps, [_first_line(w) for w in info.warnings]


def _first_line(e: object) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
