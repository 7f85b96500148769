"""Find the checkpoints a recipe names, on disk or in the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from graft.io import Checkpoint, open_checkpoint
from graft.recipe import ModelRef, RecipeError


def resolve_model_path(ref: ModelRef, root: Path | None) -> Path:
    """The local folder or file for a model reference; never downloads.

    Order: the path as given (relative to the working directory), then relative to the
    recipe's folder, then the local Hugging Face cache for hub ids (``org/name``).
    """
    if ref.adapter:
        raise RecipeError(
            f"model '{ref}': LoRA adapter inputs (model+adapter) are not supported yet; "
            "merge the adapter into its base first"
        )
    candidates = [Path(ref.path).expanduser()]
    if root is not None and not Path(ref.path).is_absolute():
        candidates.append(root / ref.path)
    for c in candidates:
        if c.exists():
            return c
    cached = _from_hf_cache(ref.path)
    if cached is not None:
        return cached
    raise RecipeError(
        f"model '{ref.path}' not found: no such local path"
        + (f" (also tried {root / ref.path})" if root is not None else "")
        + " and not in the local Hugging Face cache; graft never downloads — "
        "give a local path or download the model first"
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
    """Open every referenced checkpoint (headers only) keyed by its reference."""
    opened: dict[ModelRef, Checkpoint] = {}
    for ref in refs:
        opened[ref] = open_checkpoint(resolve_model_path(ref, root))
    return opened
