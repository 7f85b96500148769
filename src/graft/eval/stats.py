"""Statistics passes for data-aware merging: run a model on its task's data and record, per
tensor, what Fisher merging and RegMean need.

* :func:`fisher_diagonal` — the diagonal Fisher of every backbone parameter (the input of
  ``merge_method: fisher``).
* :func:`gram_matrices` — ``XᵀX`` of the inputs of every ``nn.Linear`` (the input of
  ``merge_method: regmean``), stored under the Linear's weight name.
* :func:`write_stats` — either pass on a zoo model, written with ``graft.io.save_statistics``
  so the merge planner can check the statistic's kind and the model it was computed on.

Both passes keep the head fixed and return statistics for backbone tensors only, keyed by
the names the backbone is saved under.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from graft.io import open_checkpoint, save_statistics
from graft.recipe import RecipeError

KINDS = ("fisher", "gram")
FISHER_TARGETS = ("label", "expected")


def sample_rows(n: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``min(n, n_samples)`` rows drawn without replacement, fixed by ``seed``."""
    if n_samples >= n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_samples].sort().values


def fisher_diagonal(
    backbone: nn.Module,
    head: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    target: str = "label",
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the backbone's parameters on ``(X, y)``.

    Per-example gradients (``torch.func.vmap(grad(...))``), squared, averaged over the N
    examples:

    * ``target="label"`` — the empirical Fisher, ``mean_n (∂ log p(y_n | x_n) / ∂θ)²``.
    * ``target="expected"`` — the Fisher of the model's predictive distribution,
      ``mean_n Σ_c p(c | x_n) (∂ log p(c | x_n) / ∂θ)²`` (Matena & Raffel's main variant;
      C backward passes per example). ``y`` is unused.

    Args:
        backbone: maps ``X`` to features; evaluated in eval mode.
        head: maps features to logits; fixed (its parameters get no Fisher).
        X: inputs, first dimension N.
        y: int64 labels (N,).
        target: ``"label"`` or ``"expected"``.
        batch_size: examples per vectorised gradient batch (memory ~ batch x parameters).

    Returns:
        Parameter name -> float32 tensor shaped like the parameter.
    """
    if target not in FISHER_TARGETS:
        raise ValueError(f"target must be one of {FISHER_TARGETS}, got {target!r}")
    backbone.eval()
    head.eval()
    params = {n: p.detach() for n, p in backbone.named_parameters()}
    buffers = {n: b.detach() for n, b in backbone.named_buffers()}

    def log_probs(p: dict, x: torch.Tensor) -> torch.Tensor:
        feats = functional_call(backbone, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(head(feats), dim=-1)[0]

    def log_p(p: dict, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return log_probs(p, x).gather(0, label.view(1))[0]

    per_example = vmap(grad(log_p), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for start in range(0, len(X), batch_size):
        xb = X[start : start + batch_size]
        if target == "label":
            _accumulate(total, per_example(params, xb, y[start : start + batch_size]), None)
            continue
        with torch.no_grad():
            probs = torch.softmax(head(backbone(xb)), dim=-1)
        for c in range(probs.shape[1]):
            labels = torch.full((len(xb),), c, dtype=torch.long)
            _accumulate(total, per_example(params, xb, labels), probs[:, c])
    return {n: (t / max(len(X), 1)).float() for n, t in total.items()}


def fisher_mean(fisher: dict[str, torch.Tensor]) -> float:
    """Mean of a model's Fisher over all its entries."""
    total = sum(float(t.double().sum()) for t in fisher.values())
    return total / max(sum(t.numel() for t in fisher.values()), 1)


def normalize_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's Fisher divided by its mean over all entries (mean 1 afterwards).

    Raw Fishers of different models can differ by orders of magnitude (a model with a
    higher loss has larger gradients everywhere), and then the per-entry weighted average
    follows that one model on every tensor. One factor per model removes that scale while
    keeping the relative importance of entries within the model, and makes the merge's
    ``epsilon`` floor relative to the model's mean Fisher. (MergeLM divides by the global
    L2 norm instead; either is one factor per model.)
    """
    mean = fisher_mean(fisher)
    if mean <= 0:
        return fisher
    return {n: (t / mean).float() for n, t in fisher.items()}


def _accumulate(
    total: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], scale: torch.Tensor | None
) -> None:
    """``total[n] += Σ_b scale_b · grads[n][b]²`` in float64."""
    for n, g in grads.items():
        sq = g.detach().double().square()
        if scale is not None:
            sq = sq * scale.double().view(-1, *([1] * (sq.dim() - 1)))
        total[n] += sq.sum(dim=0)


def gram_matrices(
    backbone: nn.Module, X: torch.Tensor, *, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """``XᵀX`` of the inputs of every ``nn.Linear`` in ``backbone``, summed over all rows.

    Returns:
        ``"<linear name>.weight"`` -> float32 ``(in, in)`` Gram (accumulated in float64).
    """
    return _gram_pass(backbone, X, batch_size)[0]


def _gram_pass(
    backbone: nn.Module, X: torch.Tensor, batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Grams and, per weight name, the number of input rows that went into it."""
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def make_hook(key: str, in_features: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].detach().reshape(-1, in_features).double()
            if key not in grams:
                grams[key] = torch.zeros(in_features, in_features, dtype=torch.float64)
                rows[key] = 0
            grams[key] += x.T @ x
            rows[key] += x.shape[0]

        return hook

    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            hooks.append(module.register_forward_hook(make_hook(key, module.in_features)))
    backbone.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(X), batch_size):
                backbone(X[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {k: g.float() for k, g in grams.items()}, rows


def write_stats(
    kind: str,
    model_dir: str | os.PathLike,
    task: str,
    out_path: str | os.PathLike,
    zoo: Any,
    n_samples: int = 256,
    *,
    split: str = "train",
    target: str = "label",
    normalize: bool = True,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Compute one statistic of a zoo model on its task's data and save it.

    Args:
        kind: ``"fisher"`` or ``"gram"``.
        model_dir: a backbone model directory (fine-tuned, base or merged).
        task: the task whose data (and, for Fisher, whose head) to use.
        out_path: the ``.safetensors`` file to write.
        zoo: a ``graft.zoo.build.Zoo`` or its root folder (heads, seed).
        n_samples: examples drawn from ``split`` (all of them when fewer).
        split: data split; the model's own training data by default.
        target: Fisher variant, ``"label"`` (empirical) or ``"expected"``.
        normalize: Fisher only: divide by its mean over every entry of the model (see
            :func:`normalize_fisher`); the raw mean is kept in the ``fisher_mean`` metadata.
        seed: seed of the example draw.
        force: replace an existing output file.

    Raises:
        RecipeError: unknown kind, task or Fisher target; no head for the task.
    """
    from graft.models.digits_net import load_backbone, load_head
    from graft.zoo.tasks import TASKS, task_data

    if kind not in KINDS:
        raise RecipeError(f"unknown statistic {kind!r}; valid: {', '.join(KINDS)}")
    if target not in FISHER_TARGETS:
        raise RecipeError(f"unknown Fisher target {target!r}; valid: {', '.join(FISHER_TARGETS)}")
    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if n_samples < 1:
        raise RecipeError(f"--samples must be >= 1, got {n_samples}")
    zoo = _as_zoo(zoo)
    backbone, _ = load_backbone(model_dir)
    X, y = task_data(task, split, seed=zoo.seed)
    idx = sample_rows(len(X), n_samples, seed)
    X, y = X[idx], y[idx]
    meta = {"task": task, "split": split, "n_samples": str(len(X)), "sample_seed": str(seed)}
    if kind == "fisher":
        if task not in zoo.heads:
            raise RecipeError(f"zoo {zoo.root} has no head for task {task!r}; rebuild the zoo")
        tensors = fisher_diagonal(backbone, load_head(zoo.heads[task]), X, y, target=target)
        meta["fisher"] = "empirical (label)" if target == "label" else "expected (model)"
        meta["fisher_mean"] = repr(fisher_mean(tensors))
        meta["fisher_normalized"] = "mean" if normalize else "none"
        if normalize:
            tensors = normalize_fisher(tensors)
    else:
        tensors, rows = _gram_pass(backbone, X, batch_size=256)
        meta["rows"] = str(max(rows.values(), default=0))
    with open_checkpoint(model_dir) as ckpt:
        fingerprint = ckpt.fingerprint()
    return save_statistics(
        tensors, out_path, kind=kind, model_fingerprint=fingerprint, metadata=meta, force=force
    )


def _as_zoo(zoo: Any):
    if isinstance(zoo, str | os.PathLike):
        from graft.zoo.build import load_zoo

        root = Path(zoo)
        if not root.exists():
            raise RecipeError(f"zoo {root} not found; build it first (graft demo) or pass --zoo")
        try:
            return load_zoo(root)
        except ValueError as exc:  # ZooError: not a zoo, or incomplete
            raise RecipeError(str(exc)) from None
    return zoo
