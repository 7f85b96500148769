"""Ranking models for a labelled data set without fine-tuning them: load each model graft
can run, extract features (and source-label probabilities) with batched forward passes,
and compute transferability scores (`graft.find.SCORES`).

Models: anything `graft.data.load_runner` runs: a local Hugging Face folder (``AutoModel``
or ``AutoModelForSequenceClassification``; sentence-transformers folders included) or a
graft digits backbone. Features are its pooled last hidden state (`graft.data.features`:
``mean`` over real tokens by default; ``cls``, ``max``, ``last``), a digits backbone's
output as it is.

A model's *source head* (its own classifier, needed by LEEP and NCE) is, in order: the
classifier of a ``*ForSequenceClassification`` folder, ``head.safetensors`` in the model
folder, or the head a digits-zoo folder keeps for it (``base_head.safetensors``,
``heads/<task>.safetensors``, ``soup_heads/<i>.safetensors``). Its probabilities are the
softmax of its logits on the data; its label space need not be the data's (LEEP and NCE
take source labels as given). Without one, LEEP and NCE are None for that model, with a
note.

Data: anything `graft.data.read_data` reads (CSV / TSV / JSONL text, numeric CSV, ``.npz``,
image folders, ``task:NAME`` zoo tasks), or a ``.safetensors`` file of ``inputs`` and
integer ``labels``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from graft.data import DataError, DataOptions, Dataset, Runner, load_runner, read_data
from graft.find._registry import DEFAULT_SCORE, get_score
from graft.find.features import model_features
from graft.io import load_state_dict, open_checkpoint

_INPUT_KEYS = ("inputs", "x", "X", "images")
_LABEL_KEYS = ("labels", "y", "targets")


class RankError(ValueError):
    """Bad ranking input: a data set or model graft cannot use. One line, with the fix."""


@dataclass
class RankModel:
    """A model ready to score: its runner (with its source head, if it has one), and notes.

    Attributes:
        path: the model folder.
        runner: `graft.data.Runner`; ``runner.has_head`` says whether there is a source head.
        notes: what a user should know (tensors the encoder does not use, ...).
        head_note: why there is no source head (shown when LEEP / NCE are asked for).
    """

    path: str
    runner: Runner
    notes: list[str] = field(default_factory=list)
    head_note: str | None = None

    @property
    def source_head(self) -> str | None:
        """Where the source head comes from, or None."""
        return self.runner.head_source if self.runner.has_head else None


def load_model(
    path: str | os.PathLike, *, pooling: str | None = None, max_length: int | None = None
) -> RankModel:
    """Load a model for ranking (module docstring), with its source head when it has one.

    Raises:
        RankError: graft cannot run the model (the message says why).
        GraftIOError: a checkpoint cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise RankError(f"{p}: no such file or directory; pass a model folder")
    zoo_head = _zoo_head_file(p)
    try:
        runner = load_runner(p, head=zoo_head, pooling=pooling, max_length=max_length)
    except DataError as e:
        if zoo_head is None:
            raise RankError(f"graft cannot run {p}: {e}") from None
        note = f"source head {zoo_head} unusable ({e}): leep and nce skipped"
        return RankModel(str(p), _runner(p, pooling, max_length), head_note=note)
    model = RankModel(str(p), runner, notes=list(runner.notes))
    if not runner.has_head:
        model.head_note = (
            "no source head (a sequence-classification folder's classifier, or "
            "head.safetensors): leep and nce skipped"
        )
    return model


def _runner(p: Path, pooling, max_length) -> Runner:
    try:
        return load_runner(p, pooling=pooling, max_length=max_length)
    except DataError as e:
        raise RankError(f"graft cannot run {p}: {e}") from None


def _zoo_head_file(path: Path) -> Path | None:
    """The source head a digits-zoo folder keeps for ``path`` (None when the folder has
    its own: a classifier config or ``head.safetensors``)."""
    if (path / "head.safetensors").is_file() or not path.is_dir():
        return None
    root = path.parent
    candidates = []
    if (root / "manifest.json").is_file() and path.name == "base":
        candidates.append(root / "base_head.safetensors")
    if root.name == "finetuned" and (root.parent / "manifest.json").is_file():
        candidates.append(root.parent / "heads" / f"{path.name}.safetensors")
    if root.name == "soup" and (root.parent / "manifest.json").is_file():
        candidates.append(root.parent / "soup_heads" / f"{path.name}.safetensors")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None
    with open_checkpoint(path) as ckpt:
        archs = (ckpt.config or {}).get("architectures") or []
    own = any(str(a).endswith("ForSequenceClassification") for a in archs)
    return None if own else found


def load_data(
    spec: str,
    *,
    split: str = "train",
    zoo: str | os.PathLike | None = None,
    options: DataOptions | None = None,
) -> Dataset:
    """A labelled data set from ``spec`` (module docstring).

    Args:
        spec: ``task:NAME`` (or a bare NAME), a data file or folder `graft.data.read_data`
            reads, or a ``.safetensors`` file of inputs and integer labels.
        split: the zoo task's split (``train`` by default: rank on data you may train on).
        zoo: the zoo folder of a task (its seed fixes the splits).
        options: columns and limit of a text table.

    Raises:
        RankError: a missing file, or labels unfit for ranking (`check_dataset`).
        DataError: the data cannot be read (names the file, row or column).
        GraftIOError: the file cannot be read.
    """
    from graft.data.resolve import default_zoo
    from graft.data.zoo_tasks import all_task_names

    path = Path(spec)
    is_task = spec.startswith("task:") or (not path.exists() and spec in all_task_names())
    if not is_task and not path.exists():
        raise RankError(
            f"cannot read data {spec!r}: no such file or folder; pass task:NAME (a zoo task), "
            "a .csv/.tsv/.jsonl/.npz/.safetensors file, or an image folder"
        )
    if path.suffix == ".safetensors" and not is_task:
        arrays = load_state_dict(path)
        X, y = check_dataset(
            _pick(arrays, _INPUT_KEYS, spec), _pick(arrays, _LABEL_KEYS, spec), where=spec
        )
        names = tuple(str(i) for i in range(int(y.max()) + 1))
        return Dataset(str(path), y.numpy(), names, x=X.numpy())
    data = read_data(spec, options, zoo=default_zoo(spec, zoo), split=split)
    classes, counts = np.unique(data.labels, return_counts=True)
    if len(classes) < 2:
        only = f" (all {data.label_names[classes[0]]})" if len(classes) else ""
        raise RankError(
            f"{data.name}: labels hold {len(classes)} class{only}; ranking needs at least two"
        )
    _two_each(data.name, counts, [data.label_names[c] for c in classes])
    return data


def _two_each(where: str, counts, names) -> None:
    """The linear probe cross-validates: every class needs an example in two folds."""
    for name, count in zip(names, counts, strict=True):
        if count < 2:
            raise RankError(
                f"{where}: class {name} has {int(count)} example; ranking needs at least two "
                "of every class (the linear probe cross-validates); add examples"
            )


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
    _two_each(where, torch.bincount(y).tolist(), [int(v) for v in values])
    X = X.float()
    if not torch.isfinite(X).all():
        raise RankError(f"{where}: inputs contain NaN or infinite values")
    return X, y


def rank_models(
    models: Iterable[RankModel],
    data: Dataset | torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    scores: list[str],
    sort_by: str = DEFAULT_SCORE,
    batch_size: int = 256,
    hook: Callable[[int], None] | None = None,
) -> list[dict]:
    """Score every model on labelled ``data``; rows sorted best first by ``sort_by``.

    Args:
        models: from `load_model` (an iterator is consumed one model at a time, so only
            one model need be in memory).
        data: from `load_data`; or inputs ``(N, ...)`` with ``labels`` (`check_dataset`).
        labels: the labels of tensor inputs.
        scores: registry names (`graft.find.SCORES`).
        sort_by: the score to sort by (must be in ``scores``).
        batch_size: examples per forward pass.
        hook: called with the number of examples done after each batch of each pass
            (features, then source probabilities when asked for: ``len(data)`` each).

    Returns:
        Per model ``{"rank", "model", "kind", "num_features", "source_head", "scores":
        {name: value or None}, "seconds": {"features": s, name: s}, "notes": [...]}``; None
        where a score does not apply (LEEP / NCE without a source head).

    Raises:
        RankError: an unknown score, or data that does not fit a model.
    """
    specs = [_score(n) for n in scores]
    if sort_by not in scores:
        raise RankError(
            f"cannot sort by {sort_by!r}: it is not among the scores {', '.join(scores)}"
        )
    if isinstance(data, torch.Tensor):
        if labels is None:
            raise RankError("tensor inputs need their labels: rank_models(models, X, y, ...)")
        X, y = check_dataset(data, labels, where="inputs")
        data = Dataset("inputs", y.numpy(), (), x=X.numpy())
    # Classes 0..C-1 that all occur (a --limit may leave some of the file's out).
    y = torch.unique(torch.from_numpy(data.labels), return_inverse=True)[1]
    inputs = replace(data, labels=None)  # the source head's labels need not be the data's
    wants_head = any(s.needs == "source_probs" for s in specs)
    rows = []
    for m in models:
        _check_fits(m, inputs)
        start = time.perf_counter()
        feats, probs = model_features(
            m, inputs, source=wants_head, batch_size=batch_size, hook=hook
        )
        if wants_head and probs is None and hook is not None:
            hook(len(inputs))  # the probabilities pass the progress total counted
        head_notes = [m.head_note] if wants_head and m.head_note else []
        row = {
            "model": m.path,
            "kind": m.runner.kind,
            "num_features": feats.shape[1],
            "source_head": m.source_head,
            "scores": {},
            "notes": [*head_notes, *m.notes],
            "seconds": {"features": time.perf_counter() - start},
        }
        with _one_thread():
            for s in specs:
                x = feats if s.needs == "features" else probs
                if x is None:
                    row["scores"][s.name] = None
                    continue
                start = time.perf_counter()
                row["scores"][s.name] = float(s.fn(x, y))
                row["seconds"][s.name] = time.perf_counter() - start
        rows.append(row)
        del m, feats, probs  # before the next model loads: one model in memory at a time
    rows.sort(key=lambda r: (r["scores"][sort_by] is None, -(r["scores"][sort_by] or 0.0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _check_fits(m: RankModel, data: Dataset) -> None:
    """The data is of a kind the model takes (one line naming both, with the fix)."""
    runner = m.runner
    if data.kind == "array" and runner.input_size is not None:
        width = math.prod(data.x.shape[1:])
        if width != runner.input_size:
            raise RankError(
                f"{m.path} takes inputs of {runner.input_size} values, the data has {width} "
                f"per input (shape {tuple(data.x.shape[1:])}); rank models on data they were "
                "built for"
            )
    try:
        runner.check(data)
    except DataError as e:
        raise RankError(str(e)) from None


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
