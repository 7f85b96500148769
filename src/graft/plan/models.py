"""Find the checkpoints a recipe names, on disk or in the local Hugging Face cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from graft.io import Checkpoint, is_url, open_model
from graft.recipe import ModelRef, RecipeError


def resolve_model_path(
    ref: ModelRef, root: Path | None, aliases: Mapping[str, Path] | None = None
) -> Path:
    """The local folder or file for a model reference; never downloads.

    Order: another document's output (``aliases``, multi-document recipes), the path as
    given (relative to the working directory), then relative to the recipe's folder,
    then the local Hugging Face cache for hub ids (``org/name``). A ``@revision`` (branch,
    tag or commit) is looked up in the cache only: ``refs/<branch>`` or
    ``snapshots/<commit>``. For ``model+adapter`` this is the model's path;
    `open_models` resolves the adapter.
    """
    if aliases and ref.path in aliases:
        return aliases[ref.path]
    return _resolve(ref.path, root, "model", ref.revision)


def _resolve(path: str, root: Path | None, what: str, revision: str | None = None) -> Path:
    if is_url(path):  # s3://, file://...: opened through fsspec as given
        return path  # type: ignore[return-value]
    candidates = [Path(path).expanduser()]
    if root is not None and not Path(path).is_absolute():
        candidates.append(root / path)
    for c in candidates:
        if c.exists():
            if revision:
                raise RecipeError(
                    f"{what} '{path}@{revision}': '{path}' is a local path, which has no "
                    "revisions (mergekit ignores the @revision there); remove "
                    f"'@{revision}', or name the hub id whose revision is in the cache"
                )
            return c
    cached = _from_hf_cache(path, revision)
    if cached is not None:
        return cached
    if revision and (have := _cached_revisions(path)):
        raise RecipeError(
            f"{what} '{path}@{revision}': revision '{revision}' is not in the local Hugging "
            f"Face cache (cached: {', '.join(have)}); graft never downloads — download "
            "that revision first"
        )
    raise RecipeError(
        f"{what} '{path}' not found: no such local path"
        + (f" (also tried {root / path})" if root is not None else "")
        + " and not in the local Hugging Face cache; graft never downloads — "
        "give a local path or download it first"
    )


def _hub_id(repo_id: str) -> bool:
    return repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))


def _cache_dir() -> str | None:
    # read at call time: huggingface_hub reads HF_HUB_CACHE once, at import
    return os.environ.get("HF_HUB_CACHE") or None


def _from_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    if not _hub_id(repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, local_files_only=True, cache_dir=_cache_dir()
            )
        )
    except Exception:  # not cached (the hub client raises several types for this)
        return None


def _cached_revisions(repo_id: str) -> list[str]:
    """The branches and commits of ``repo_id`` in the local cache, for error messages."""
    if not _hub_id(repo_id):
        return []
    try:
        from huggingface_hub import constants
    except ImportError:
        return []
    folder = Path(_cache_dir() or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    names = []
    for sub in ("refs", "snapshots"):
        try:
            names += sorted(p.name for p in (folder / sub).iterdir())
        except OSError:
            continue
    return names[:10]


def open_models(
    refs: list[ModelRef],
    root: Path | None,
    aliases: Mapping[str, Path] | None = None,
    stand_ins: Mapping[str, Checkpoint] | None = None,
) -> dict[ModelRef, Checkpoint]:
    """Open every referenced checkpoint (headers only) keyed by its reference.

    A ``model+adapter`` reference opens the model with the PEFT LoRA adapter applied per
    tensor as it is read (`graft.delta.lora.AdaptedCheckpoint`); no merged copy is made.
    ``stand_ins`` maps a document name to a header-only stand-in for its output, for a
    ``--dry-run`` of a multi-document recipe (`graft.plan.multi`).
    """
    opened: dict[ModelRef, Checkpoint] = {}
    try:
        for ref in refs:
            if stand_ins and ref.path in stand_ins:
                if ref.adapter:
                    raise RecipeError(
                        f"model {ref}: --dry-run cannot apply an adapter to the output of "
                        f"document {ref.path!r}, which is not written yet; run the merge"
                    )
                opened[ref] = stand_ins[ref.path]
                continue
            path = resolve_model_path(ref, root, aliases)
            if ref.adapter:
                from graft.delta.lora import open_adapted  # graft.delta imports graft.plan

                adapter = _resolve(ref.adapter, root, "adapter", ref.adapter_revision)
                opened[ref] = open_adapted(path, adapter)
            else:
                opened[ref] = open_model(path)
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    return opened
