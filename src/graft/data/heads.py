"""Classification heads stored apart from the backbone (as FusionBench stores its CLIP
heads): one ``.safetensors`` file with a Linear layer's ``weight`` (C, D) and ``bias`` (C,)
and metadata naming the task, the label list and how features were pooled.

Metadata keys (all optional but ``graft_statistic``):

* ``graft_statistic: classifier_head`` — marks the file as a head;
* ``task`` — the task name;
* ``labels`` — JSON list of the label names, in id order (see `graft.data.labels`);
* ``pooling`` — how token features were pooled for this head (``mean``, ``cls``...);
* ``max_length`` — the token length the head was trained with;
* ``graft_model_fingerprint`` — the backbone it was trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graft.data.labels import DataError
from graft.io import GraftIOError, open_checkpoint, save_statistics

HEAD_KIND = "classifier_head"
HEAD_FILE = "head.safetensors"  # a head kept inside a model folder (soups, the zoo)


@dataclass
class HeadFile:
    """A loaded head and what its metadata says."""

    path: Path
    linear: nn.Linear
    task: str = ""
    label_names: tuple[str, ...] | None = None
    pooling: str | None = None
    max_length: int | None = None


def is_head_file(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` file whose metadata marks it as a graft head."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        with open_checkpoint(p) as ckpt:
            return ckpt.metadata.get("graft_statistic") == HEAD_KIND
    except GraftIOError:
        return False


def load_head_file(path: str | os.PathLike) -> HeadFile:
    """Read a head written by `save_head_file` (or by the digits zoo).

    Raises:
        DataError: the file is not a graft head, or its metadata is malformed.
        GraftIOError: the file cannot be read.
    """
    p = Path(path)
    with open_checkpoint(p) as ckpt:
        meta = ckpt.metadata
        if meta.get("graft_statistic") != HEAD_KIND or set(ckpt.names) != {"weight", "bias"}:
            raise DataError(
                f"{p} is not a graft classification head (a .safetensors with weight and bias "
                "written by graft); pass a head file or a sequence-classification model folder"
            )
        weight, bias = ckpt.get("weight").float(), ckpt.get("bias").float()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise DataError(
            f"{p}: head weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise DataError(f"{p}: the head's weight or bias holds NaN or Inf; re-train the head")
    if weight.shape[0] < 2 or weight.shape[1] < 1:
        raise DataError(
            f"{p}: head weight {tuple(weight.shape)} has {weight.shape[0]} class(es) for "
            f"{weight.shape[1]} features; a classification head needs at least 2 classes"
        )
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.eval()
    labels = _labels(meta.get("labels"), p, weight.shape[0])
    max_length = meta.get("max_length")
    return HeadFile(
        p,
        linear,
        task=meta.get("task", ""),
        label_names=labels,
        pooling=meta.get("pooling") or None,
        max_length=int(max_length) if max_length and max_length.isdigit() else None,
    )


def _labels(raw: str | None, path: Path, num_classes: int) -> tuple[str, ...] | None:
    if not raw:
        return None
    try:
        labels = json.loads(raw)
    except ValueError:
        raise DataError(f"{path}: metadata 'labels' is not JSON; re-save the head") from None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise DataError(f"{path}: metadata 'labels' must be a JSON list of strings")
    if len(labels) != num_classes:
        raise DataError(
            f"{path}: {len(labels)} label names for a head with {num_classes} outputs; re-save it"
        )
    check_unique_labels(labels, f"{path}: metadata 'labels'")
    return tuple(labels)


def check_unique_labels(names, where: str) -> None:
    """Data labels map to a head's outputs by name: two outputs of one name are ambiguous."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"{where} names class {name[:60]!r} twice; each output needs its own label name"
            )
        seen.add(name)


def save_head_file(
    linear: nn.Linear,
    path: str | os.PathLike,
    *,
    task: str = "",
    label_names: tuple[str, ...] | list[str] | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    model_fingerprint: str = "",
    force: bool = False,
) -> Path:
    """Atomically write a head to one ``.safetensors`` file (module docstring)."""
    meta = {"task": task}
    if label_names is not None:
        meta["labels"] = json.dumps(list(label_names))
    if pooling:
        meta["pooling"] = pooling
    if max_length:
        meta["max_length"] = str(int(max_length))
    tensors = {
        "weight": linear.weight.detach().float().contiguous(),
        "bias": linear.bias.detach().float().contiguous(),
    }
    return save_statistics(
        tensors,
        path,
        kind=HEAD_KIND,
        model_fingerprint=model_fingerprint,
        metadata=meta,
        force=force,
    )
