"""Writing a trained runner back as a model folder graft and transformers read.

The folder is laid out as graft writes every output: the source checkpoint's tensors with
the trained ones written over them (in the source dtypes), its config, tokenizer and
sentence-transformers files, a model card, and — when the model ran with a linear head
file — the trained head as ``head.safetensors`` beside the weights (heads are kept apart
from backbones, as the zoos and ``graft soup`` keep them). A model's own classifier
(a ``*ForSequenceClassification`` checkpoint) stays inside the checkpoint. Everything is
written into a hidden temp folder and renamed into place, so OUT appears only complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graft.data import Runner, save_head_file
from graft.data.heads import HEAD_FILE, is_head_file, load_head_file
from graft.data.train import trained_state
from graft.io import (
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    open_checkpoint,
    write_model_card,
)


def save_trained(
    runner: Runner,
    out: str | os.PathLike,
    *,
    sources: list[str],
    card_yaml: str,
    title: str,
    inputs: list[str | os.PathLike] = (),
    force: bool = False,
    overwrite_anything: bool = False,
) -> Path:
    """Write ``runner``'s model, trained in place, to the folder ``out`` (module docstring).

    Args:
        sources: the models it was made from, for the card's ``base_model``.
        card_yaml: what was run (mode and settings), shown in the card.
        inputs: paths ``out`` must stay apart from.

    Raises:
        GraftIOError: ``out`` may not be written; the disk filled up.
    """
    from graft import __version__

    with open_checkpoint(runner.path) as ckpt:
        base = {n: ckpt.get(n) for n in ckpt.names}
        config, root, modules_root = ckpt.config, ckpt.root, ckpt.modules_root
    state = trained_state(runner, base)
    head = getattr(runner.module, "head", None)
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    meta = {"graft_version": __version__, "graft_method": "distill"}
    with atomic_output_dir(
        Path(out), force=force, inputs=inputs, overwrite_anything=overwrite_anything
    ) as tmp:
        with ShardedWriter(tmp, entries, metadata=meta) as writer:
            for name, t in state.items():
                writer.write(name, t.contiguous())
            writer.finish()
        copy_sidecar_files(root, tmp, config=config, modules_root=modules_root)
        if isinstance(head, torch.nn.Linear):
            _save_head(runner, head, tmp / HEAD_FILE)
        write_model_card(
            tmp,
            base_models=sources,
            relation="finetune",
            tags=("graft", "distill"),
            recipe_yaml=card_yaml,
            title=title,
        )
    return Path(out)


def _save_head(runner: Runner, head: torch.nn.Linear, path: Path) -> None:
    """The trained head, with the metadata of the head file it started from."""
    src = Path(runner.head_source)
    info = load_head_file(src) if is_head_file(src) else None
    save_head_file(
        head,
        path,
        task=info.task if info else "",
        label_names=runner.label_names,
        pooling=runner.pooling if runner.kind == "transformers" else None,
        max_length=(info.max_length if info else None)
        or (runner.max_length if runner.kind == "transformers" else None),
    )
