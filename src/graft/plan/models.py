"""Find the checkpoints a recipe names, on disk or in the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from graft.io import Checkpoint, open_checkpoint
from graft.recipe import ModelRef, RecipeError


def resolve_model_path(ref: ModelRef, root: Path | None) -> Path:
    """The local folder or file for a model reference; never downloads.

    Order: the path as given (relative to the working directory), then relative to the
    recipe's folder, then the local Hugging Face cache for hub ids (``org/name``). For
    ``model+adapter`` this is the model's path; `open_models` resolves the adapter.
    """
    return _resolve(ref.path, root, "model")


def _resolve(path: str, root: Path | None, what: str) -> Path:
    candidates = [Path(path).expanduser()]
    if root is not None and not Path(path).is_absolute():
        candidates.append(root / path)
    for c in candidates:
        if c.exists():
            return c
    cached = _from_hf_cache(path)
    if cached is not None:
        return cached
    raise RecipeError(
        f"{what} '{path}' not found: no such local path"
        + (f" (also tried {root / path})" if root is not None else "")
        + " and not in the local Hugging Face cache; graft never downloads — "
        "give a local path or download it first"
    )


def _from_hf_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (the hub client raises several types for this)
        return None


def open_models(refs: list[ModelRef], root: Path | None) -> dict[ModelRef, Checkpoint]:
    """Open every referenced checkpoint (headers only) keyed by its reference.

    A ``model+adapter`` reference opens the model with the PEFT LoRA adapter applied per
    tensor as it is read (`graft.delta.lora.AdaptedCheckpoint`); no merged copy is made.
    """
    opened: dict[ModelRef, Checkpoint] = {}
    try:
        for ref in refs:
            path = resolve_model_path(ref, root)
            if ref.adapter:
                from graft.delta.lora import open_adapted  # graft.delta imports graft.plan

                opened[ref] = open_adapted(path, _resolve(ref.adapter, root, "adapter"))
            else:
                opened[ref] = open_checkpoint(path)
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    return opened
