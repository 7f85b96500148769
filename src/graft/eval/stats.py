"""Statistics passes for data-aware merging: run a model on data and record, per tensor,
what Fisher merging and RegMean need. Any model graft can run (`graft.data.Runner`: a
Hugging Face folder or a digits-zoo backbone) on any data set (`graft.data.read_data`).

* :func:`fisher_pass` — the diagonal Fisher of every float tensor the model reads from
  its checkpoint (the input of ``merge_method: fisher``).
* :func:`gram_pass` — ``XᵀX`` of the inputs of every ``nn.Linear`` / ``Conv1D`` (the
  input of ``merge_method: regmean``), stored under the layer's weight name.
* :func:`write_stats` — either pass, written with ``graft.io.save_statistics`` so the
  merge planner can check the statistic's kind and the model it was computed on.

Statistics are keyed by the tensor names of the model's checkpoint (what the merge engine
sees), whatever the module calls them. A separate head (a head file, or another model's
classifier) is held fixed and gets no statistics; a model's own classifier does.
:func:`fisher_diagonal` and :func:`gram_matrices` are the same passes on in-memory digits
backbones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.data.dataset import Dataset
from graft.data.runner import Runner
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
    """Diagonal Fisher of a digits backbone's parameters on ``(X, y)``, head fixed.

    The array form of :func:`fisher_pass` (same math), keyed by the backbone's names.
    ``batch_size`` is accepted for compatibility; gradients are per example.
    """
    runner = _array_runner(backbone, head)
    data = Dataset("X", y.numpy(), tuple(str(i) for i in range(head.out_features)), x=X.numpy())
    return fisher_pass(runner, data, target=target)


def fisher_pass(
    runner: Runner,
    data: Dataset,
    *,
    target: str = "label",
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every parameter the runner reads from its checkpoint.

    Per-example gradients (one forward and backward pass per example, model in eval
    mode), squared, averaged over the N examples:

    * ``target="label"`` — the empirical Fisher, ``mean_n (∂ log p(y_n | x_n) / ∂θ)²``.
    * ``target="expected"`` — the Fisher of the model's predictive distribution,
      ``mean_n Σ_c p(c | x_n) (∂ log p(c | x_n) / ∂θ)²`` (Matena & Raffel's main variant;
      C backward passes per example). Labels are not read.

    Parameters that get no gradient on this data (a pooler the pooling bypasses) are
    left out, so the merge treats them as tensors without statistics.

    Returns:
        Checkpoint tensor name -> float32 tensor shaped like the parameter.
    """
    if target not in FISHER_TARGETS:
        raise ValueError(f"target must be one of {FISHER_TARGETS}, got {target!r}")
    if target == "label" and data.labels is None:
        raise RecipeError(
            f"{data.name} has no labels; the empirical Fisher needs them (or use --target expected)"
        )
    module = runner.module
    module.eval()
    named = dict(module.named_parameters())
    wanted = {m: named[m] for m in runner.names}
    flags = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in wanted)
    params = list(wanted.values())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    used = [False] * len(params)
    try:
        for i in range(len(data)):
            logp = torch.log_softmax(runner.logits(runner.inputs(data, i, i + 1)).float(), -1)[0]
            if target == "label":
                _add_squares(
                    total,
                    used,
                    torch.autograd.grad(logp[int(data.labels[i])], params, allow_unused=True),
                    1.0,
                )
            else:
                probs = logp.detach().exp()
                for c in range(len(logp)):
                    grads = torch.autograd.grad(
                        logp[c], params, retain_graph=c + 1 < len(logp), allow_unused=True
                    )
                    _add_squares(total, used, grads, float(probs[c]))
            if progress is not None:
                progress(1)
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
    n = max(len(data), 1)
    return {
        runner.names[m]: (t / n).float()
        for (m, _), t, u in zip(wanted.items(), total, used, strict=True)
        if u
    }


def _add_squares(total, used, grads, scale: float) -> None:
    for k, g in enumerate(grads):
        if g is not None:
            total[k] += g.detach().double().square() * scale
            used[k] = True


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


def gram_matrices(
    backbone: nn.Module, X: torch.Tensor, *, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """``XᵀX`` of the inputs of every ``nn.Linear`` in a digits backbone, summed over rows.

    Returns:
        ``"<linear name>.weight"`` -> float32 ``(in, in)`` Gram (accumulated in float64).
    """
    data = Dataset("X", None, (), x=X.numpy())
    return gram_pass(_array_runner(backbone, None), data, batch_size=batch_size).grams


@dataclass
class Grams:
    """The result of :func:`gram_pass`.

    Attributes:
        grams: weight's checkpoint name -> float32 ``(in, in)`` Gram.
        rows: weight's checkpoint name -> number of input rows summed into its Gram.
        input_first: names of weights stored ``(in, out)`` (transformers' ``Conv1D``, as
            in GPT-2), whose Gram is over their *first* dimension.
    """

    grams: dict[str, torch.Tensor]
    rows: dict[str, int]
    input_first: list[str]


def gram_pass(
    runner: Runner,
    data: Dataset,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Grams:
    """Gram matrices of the inputs of every linear layer the runner reads from its
    checkpoint: ``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D`` (weight
    ``(in, out)``), summed over every input row.

    Rows are token positions for token models; padding positions (attention mask 0) are
    left out, so a Gram does not depend on how examples were batched.
    """
    linear_types: tuple[type, ...] = (nn.Linear,)
    conv1d = _conv1d_type()
    if conv1d is not None:
        linear_types += (conv1d,)
    weight_names = {
        m.removesuffix(".weight"): c for m, c in runner.names.items() if m.endswith(".weight")
    }
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    input_first: list[str] = []
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}
    hooks = []

    def make_hook(key: str, width: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].detach()
            mask = mask_holder["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            x = x.reshape(-1, width).double()
            if key not in grams:
                grams[key] = torch.zeros(width, width, dtype=torch.float64)
                rows[key] = 0
            grams[key] += x.T @ x
            rows[key] += x.shape[0]

        return hook

    for name, module in runner.module.named_modules():
        if isinstance(module, linear_types) and name in weight_names:
            key = weight_names[name]
            first = conv1d is not None and isinstance(module, conv1d)
            width = module.weight.shape[0] if first else module.weight.shape[1]
            if first:
                input_first.append(key)
            hooks.append(module.register_forward_hook(make_hook(key, width)))
    runner.module.eval()
    try:
        with torch.no_grad():
            for inputs, _ in runner.batches(data, batch_size):
                mask_holder["mask"] = inputs.get("attention_mask")
                runner.features(inputs) if not runner.has_head else runner.logits(inputs)
                if progress is not None:
                    progress(len(next(iter(inputs.values()))))
    finally:
        for h in hooks:
            h.remove()
    return Grams({k: g.float() for k, g in grams.items()}, rows, sorted(input_first))


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _array_runner(backbone: nn.Module, head: nn.Module | None) -> Runner:
    """A digits-style runner around an in-memory backbone (names = its own)."""
    from graft.data.runner import DigitsClassifier

    module = DigitsClassifier(backbone, head)
    names = {f"backbone.{n}": n for n, _ in backbone.named_parameters()}
    return Runner(
        Path("<in memory>"),
        "digits",
        module,
        names,
        label_names=None,
        num_classes=None if head is None else head.out_features,
        num_features=0,
    )


def write_stats(
    kind: str,
    runner: Runner,
    data: Dataset,
    out_path: str | os.PathLike,
    *,
    n_samples: int = 256,
    target: str = "label",
    normalize: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Compute one statistic of a model on data and save it for a data-aware merge.

    Args:
        kind: ``"fisher"`` or ``"gram"``.
        runner: the model (`graft.data.load_runner`); Fisher needs its head.
        data: the examples (`graft.data.read_data`), labelled for the empirical Fisher.
        out_path: the ``.safetensors`` file to write.
        n_samples: examples drawn from ``data`` without replacement (all when fewer).
        target: Fisher variant, ``"label"`` (empirical) or ``"expected"``.
        normalize: Fisher only: divide by its mean over every entry of the model (see
            :func:`normalize_fisher`); the raw mean is kept in the ``fisher_mean`` metadata.
        seed: seed of the example draw.
        batch_size: examples per forward pass (Gram).
        force: replace an existing output file.
        progress: called with the number of examples done.

    Raises:
        RecipeError: unknown kind or Fisher target, no head for Fisher, too few samples.
    """
    if kind not in KINDS:
        raise RecipeError(f"unknown statistic {kind!r}; valid: {', '.join(KINDS)}")
    if target not in FISHER_TARGETS:
        raise RecipeError(f"unknown Fisher target {target!r}; valid: {', '.join(FISHER_TARGETS)}")
    if n_samples < 1:
        raise RecipeError(f"--samples must be >= 1, got {n_samples}")
    data = runner.prepare(data)
    data = data.subset(sample_rows(len(data), n_samples, seed).numpy())
    meta = {"data": data.name, "n_samples": str(len(data)), "sample_seed": str(seed)}
    if data.task:
        meta["task"] = data.task
    if kind == "fisher":
        if not runner.has_head:
            raise RecipeError(
                f"the Fisher of {runner.path} needs its classifier: pass --head (a head file "
                "or a sequence-classification model folder)"
            )
        tensors = fisher_pass(runner, data, target=target, progress=progress)
        meta["fisher"] = "empirical (label)" if target == "label" else "expected (model)"
        meta["fisher_mean"] = repr(fisher_mean(tensors))
        meta["fisher_normalized"] = "mean" if normalize else "none"
        meta["head"] = runner.head_source
        if normalize:
            tensors = normalize_fisher(tensors)
    else:
        result = gram_pass(runner, data, batch_size=batch_size, progress=progress)
        tensors = result.grams
        meta["rows"] = str(max(result.rows.values(), default=0))
        if result.input_first:
            meta["graft_input_first"] = json.dumps(result.input_first)
    if not tensors:
        raise RecipeError(f"no {kind} statistics came out of {runner.path}; nothing to save")
    with open_checkpoint(runner.path) as ckpt:
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
