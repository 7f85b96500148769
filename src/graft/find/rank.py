"""Ranking models for a labelled data set without fine-tuning them: load each model graft
can run, extract features (and source-label probabilities) with batched forward passes,
and compute transferability scores (`graft.find.SCORES`).

Which models graft can run is data: `RUNNERS` maps a config's architecture to a loader.
Today that is graft's digits backbones (`graft.models.digits_net`); a model's *source
head* (its pretraining classifier, needed by LEEP and NCE) is ``head.safetensors`` in the
model folder, or the head a digits-zoo folder keeps for it (``base_head.safetensors``,
``heads/<task>.safetensors``, ``soup_heads/<i>.safetensors``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graft.find._registry import DEFAULT_SCORE, get_score
from graft.find.features import extract_features
from graft.io import load_state_dict, open_checkpoint, read_arrays

_INPUT_KEYS = ("inputs", "x", "X", "images")
_LABEL_KEYS = ("labels", "y", "targets")


class RankError(ValueError):
    """Bad ranking input: a data set or model graft cannot use. One line, with the fix."""


@dataclass
class RankModel:
    """A model ready to score: its backbone, its source head if it has one, and notes."""

    path: str
    backbone: nn.Module
    head: nn.Module | None = None
    input_size: int | None = None  # flattened input size the backbone expects
    notes: list[str] = field(default_factory=list)
    head_note: str | None = None  # why there is no source head (shown when LEEP/NCE asked)


def load_model(path: str | os.PathLike) -> RankModel:
    """Load a model for ranking, choosing the loader by its config's architecture.

    Raises:
        RankError: graft cannot run this architecture, or the files do not fit it.
        GraftIOError: the path is missing or unreadable.
    """
    with open_checkpoint(path) as ckpt:
        config = ckpt.config or {}
    arch = (config.get("architectures") or [None])[0]
    runner = RUNNERS.get(arch)
    if runner is None:
        what = f"architecture {arch}" if arch else "no config.json architecture"
        raise RankError(
            f"graft cannot run {path} ({what}); `graft rank` runs {', '.join(RUNNERS)} models"
        )
    return runner(Path(path))


def _load_digits(path: Path) -> RankModel:
    from graft.models.digits_net import load_backbone

    try:
        backbone, config = load_backbone(path)
    except ValueError as e:
        raise RankError(str(e)) from e
    model = RankModel(str(path), backbone, input_size=config["input_size"])
    head_file = _digits_head_file(path)
    if head_file is None:
        model.head_note = "no source head (head.safetensors): leep and nce skipped"
        return model
    from graft.models.digits_net import load_head

    try:
        head = load_head(head_file)
    except ValueError as e:
        model.head_note = f"source head {head_file} unusable ({e}): leep and nce skipped"
        return model
    if head.in_features != config["hidden_size"]:
        model.head_note = f"source head {head_file} does not fit the backbone: leep and nce skipped"
        return model
    model.head = head
    return model


def _digits_head_file(path: Path) -> Path | None:
    """The source head of a digits backbone, by graft's layouts (module docstring)."""
    candidates = [path / "head.safetensors"]
    root = path.parent
    if (root / "manifest.json").is_file() and path.name == "base":
        candidates.append(root / "base_head.safetensors")
    if root.name == "finetuned" and (root.parent / "manifest.json").is_file():
        candidates.append(root.parent / "heads" / f"{path.name}.safetensors")
    if root.name == "soup" and (root.parent / "manifest.json").is_file():
        candidates.append(root.parent / "soup_heads" / f"{path.name}.safetensors")
    return next((c for c in candidates if c.is_file()), None)


# Architecture (config.json "architectures"[0]) -> loader. One line per runnable family.
RUNNERS: dict[str, Callable[[Path], RankModel]] = {"GraftDigitsNet": _load_digits}


def load_data(
    spec: str, *, split: str = "train", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A labelled data set from ``spec``.

    Args:
        spec: ``task:NAME`` (or a bare NAME) for a digits-zoo task, or a ``.safetensors`` /
            ``.npz`` file holding inputs (``inputs``, ``x``, ``X`` or ``images``) and
            integer labels (``labels``, ``y`` or ``targets``).
        split: the zoo task's split (``train`` by default: rank on data you may train on).
        seed: the zoo's split seed.

    Returns:
        ``(inputs float32, labels int64 remapped to 0..C-1, description)``.

    Raises:
        RankError: unknown task, unknown file kind, missing keys, or invalid labels
            (`check_dataset`).
        GraftIOError: the file cannot be read.
    """
    from graft.zoo.tasks import SPLITS, TASKS, task_data

    name = spec.removeprefix("task:")
    if spec.startswith("task:") or (name in TASKS and not Path(spec).exists()):
        if name not in TASKS:
            raise RankError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
        if split not in SPLITS:
            raise RankError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        X, y = task_data(name, split, seed=seed)
        return (*check_dataset(X, y, where=spec), f"task {name}, {split} split")
    path = Path(spec)
    if path.suffix == ".safetensors":
        arrays = load_state_dict(path)
    elif path.suffix == ".npz":
        arrays = {k: torch.from_numpy(v) for k, v in read_arrays(path).items()}
    else:
        raise RankError(
            f"cannot read data {spec!r}: pass task:NAME (a zoo task) or a .safetensors / .npz "
            "file with inputs and labels"
        )
    X, y = _pick(arrays, _INPUT_KEYS, spec), _pick(arrays, _LABEL_KEYS, spec)
    return (*check_dataset(X, y, where=spec), str(path))


def _pick(arrays: dict, keys: tuple[str, ...], where: str) -> torch.Tensor:
    for k in keys:
        if k in arrays:
            return arrays[k]
    raise RankError(
        f"{where} has no {' / '.join(keys)} array (found: {', '.join(arrays) or 'none'})"
    )


def check_dataset(
    X: torch.Tensor, y: torch.Tensor, *, where: str = "data"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a labelled data set once, where it enters.

    Returns:
        ``(inputs as float32, labels as int64 in 0..C-1)`` (sorted label values mapped to
        their rank).

    Raises:
        RankError: labels not 1-D or not integers, lengths differ, fewer than two
            classes, or non-finite inputs.
    """
    if y.ndim != 1:
        raise RankError(f"{where}: labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if X.ndim < 1 or X.shape[0] != y.shape[0]:
        raise RankError(
            f"{where}: {X.shape[0] if X.ndim else 0} inputs but {y.shape[0]} labels; give one label per input"
        )
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise RankError(f"{where}: labels must be integer classes, got fractional values")
        y = y.long()
    values, y = torch.unique(y.long(), return_inverse=True)
    if len(values) < 2:
        only = f" (all {int(values[0])})" if len(values) else ""
        raise RankError(
            f"{where}: labels hold {len(values)} class{only}; ranking needs at least two"
        )
    X = X.float()
    if not torch.isfinite(X).all():
        raise RankError(f"{where}: inputs contain NaN or infinite values")
    return X, y


def rank_models(
    models: list[RankModel],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    scores: list[str],
    sort_by: str = DEFAULT_SCORE,
    batch_size: int = 256,
    hook: Callable[[int], None] | None = None,
) -> list[dict]:
    """Score every model on ``(inputs, labels)``; rows sorted best first by ``sort_by``.

    Args:
        models: from `load_model`.
        inputs, labels: from `load_data` / `check_dataset`.
        scores: registry names (`graft.find.SCORES`).
        sort_by: the score to sort by (must be in ``scores``).
        batch_size: inputs per forward pass.
        hook: called with the number of inputs done after each batch (progress).

    Returns:
        Per model ``{"rank", "model", "num_features", "scores": {name: value or None},
        "seconds": {"features": s, name: s}, "notes": [...]}``; None where a score does
        not apply (LEEP / NCE without a source head).

    Raises:
        RankError: an unknown score, or inputs that do not fit a model.
    """
    specs = [_score(n) for n in scores]
    if sort_by not in scores:
        raise RankError(
            f"cannot sort by {sort_by!r}: it is not among the scores {', '.join(scores)}"
        )
    rows = []
    for m in models:
        width = math.prod(inputs.shape[1:])
        if m.input_size is not None and width != m.input_size:
            raise RankError(
                f"{m.path} takes inputs of {m.input_size} values, the data has {width} per "
                f"input (shape {tuple(inputs.shape[1:])}); rank models on data they were built for"
            )
        wants_head = any(s.needs == "source_probs" for s in specs)
        start = time.perf_counter()
        feats, probs = extract_features(
            m.backbone,
            inputs,
            head=m.head if wants_head else None,
            batch_size=batch_size,
            hook=hook,
        )
        notes = [*m.notes, *([m.head_note] if wants_head and m.head_note else [])]
        row = {"model": m.path, "num_features": feats.shape[1], "scores": {}, "notes": notes}
        row["seconds"] = {"features": time.perf_counter() - start}
        with _one_thread():
            for s in specs:
                x = feats if s.needs == "features" else probs
                if x is None:
                    row["scores"][s.name] = None
                    continue
                start = time.perf_counter()
                row["scores"][s.name] = float(s.fn(x, labels))
                row["seconds"][s.name] = time.perf_counter() - start
        rows.append(row)
    rows.sort(key=lambda r: (r["scores"][sort_by] is None, -(r["scores"][sort_by] or 0.0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


@contextmanager
def _one_thread():
    """Scores run many small tensor ops (L-BFGS steps, per-class solves), where torch's
    intra-op threads cost more in synchronisation than they give: ~9x slower with 2
    threads on a busy 2-core machine. Feature extraction keeps all threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _score(name: str):
    try:
        return get_score(name)
    except ValueError as e:
        raise RankError(str(e)) from None
