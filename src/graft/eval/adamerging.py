"""AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR): learn the task-arithmetic coefficients by entropy minimisation.

The merged model is ``θ = θ₀ + Σᵢ λᵢ δᵢ`` (task-wise: one ``λᵢ`` per task) or, layer-wise,
``θ = θ₀ + Σᵢ λᵢ,ₖ δᵢ,ₖ`` with one ``λᵢ,ₖ`` per task per **parameter tensor** ``k`` — the
authors' layer-wise AdaMerging (``main_layer_wise_adamerging.py``: a ``lambdas`` matrix of
tasks x parameter tensors). ``mode="block"`` keeps graft's earlier grouping as an option:
one ``λᵢ,ₗ`` per residual block ``l`` plus one per task shared by every tensor outside the
blocks (embeddings, final norm).

The coefficients start at 0.3 and are learned with Adam by minimising, summed over the
tasks, the mean Shannon entropy of task t's head on the merged model's outputs for task
t's **unlabeled inputs** — the paper's test-time setting: labels are never read. Each task
runs through its own `graft.data.Runner` (any Hugging Face model or digits backbone, with
that task's head); the merged weights are swapped in with ``functional_call``, so the
runners' own weights are never used.

Conventions that change results (paper defaults where the paper gives one):

* Adam, learning rate 1e-3, 500 steps, 16 inputs per task per step drawn at random with a
  fixed seed; coefficients clamped to ``[0, 1]`` in the forward pass, as the authors'
  code does.
* Tensors whose delta is zero in every model (frozen word embeddings) get no coefficient:
  they stay at ``θ₀`` whatever λ is. Non-float tensors are not merged.
* A runner's own classifier (a ``*ForSequenceClassification`` head) is not merged: each
  task keeps its head, as FusionBench keeps each task's classification head.
* The final model is an ordinary recipe: :func:`recipe_yaml` writes ``task_arithmetic``
  with ``lambda: 1`` and each model's ``weight`` as its learned coefficient(s): per tensor,
  a list of ``{filter: <tensor name>, value: λ}`` conditionals, longest names first (graft's
  filters are substrings and the first match wins, so a name that is a substring of
  another never takes the other's value), then a filter-less entry; per block,
  ``{filter: "blocks.<l>.", value: λ}`` entries (``"blocks.1."`` does not match
  ``blocks.10.*``: the ``0`` breaks it) and a last filter-less entry for the tensors
  outside the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from graft.data.dataset import Dataset
from graft.eval.tasks import Task
from graft.plan.arch import split_block_name

MODES = ("task", "layer", "block")
OUTSIDE = "*"  # group label of the tensors outside the blocks (block-wise), or all (task-wise)


@dataclass
class AdaMergingResult:
    """Learned coefficients.

    Attributes:
        mode: ``"task"``, ``"layer"`` (per tensor) or ``"block"``.
        groups: per tensor, the tensor names; per block, the block filters (``"blocks.0."``
            ...) then ``"*"`` for the tensors outside the blocks; task-wise, ``["*"]``.
        coefficients: task -> one clamped coefficient per group.
        entropy_initial / entropy_final: the summed mean entropy on all given inputs at
            the initial and the learned coefficients.
        history: the training loss (summed entropy of each step's batch) per step.
    """

    mode: str
    groups: list[str]
    coefficients: dict[str, list[float]]
    entropy_initial: float
    entropy_final: float
    history: list[float] = field(default_factory=list)


def tensor_groups(names: Sequence[str], mode: str) -> tuple[list[str], dict[str, int]]:
    """Group labels and each tensor's group index.

    Per tensor (``"layer"``), each tensor is its own group, in the given order. Per block,
    a block tensor's group is its block filter (``prefix + index + "."``, e.g.
    ``"blocks.3."``), sorted by index; every other tensor falls in the last group ``"*"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "task":
        return [OUTSIDE], {n: 0 for n in names}
    if mode == "layer":
        return list(names), {n: i for i, n in enumerate(names)}
    filters: dict[str, int] = {}
    for n in names:
        b = split_block_name(n)
        if b is not None:
            filters[f"{b.prefix}{b.index}."] = b.index
    groups = sorted(filters, key=lambda f: (filters[f], f)) + [OUTSIDE]
    index = {g: i for i, g in enumerate(groups)}
    out = {}
    for n in names:
        b = split_block_name(n)
        out[n] = index[f"{b.prefix}{b.index}."] if b is not None else len(groups) - 1
    return groups, out


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the rows."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def merged_params(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    lambdas: torch.Tensor,
    group_of: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """``θ₀ + Σᵢ λ[i, group(n)]·δᵢ[n]`` per tensor, differentiable in ``lambdas`` (T, G)."""
    out = {}
    for name, theta0 in base.items():
        if name not in group_of:
            out[name] = theta0
            continue
        g = group_of[name]
        merged = theta0
        for i, d in enumerate(deltas):
            merged = merged + lambdas[i, g] * d[name]
        out[name] = merged
    return out


def learn(
    tasks: Sequence[Task],
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    *,
    mode: str = "layer",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients by minimising prediction entropy.

    Args:
        tasks: one per fine-tuned model, in the same order: runner (with that task's
            head) and unlabeled inputs.
        base: ``θ₀`` by checkpoint tensor name.
        finetuned: the fine-tuned states, named like ``base``.
        mode: ``"task"``, ``"layer"`` (per tensor) or ``"block"``.
        steps: Adam steps.
        lr: Adam learning rate.
        init: initial value of every coefficient.
        batch_size: inputs per task per step.
        seed: seed of the batch draws.
        progress: called with 1 after each step.

    Returns:
        The learned coefficients and the entropy before and after.
    """
    if len(tasks) != len(finetuned):
        raise ValueError(f"{len(tasks)} tasks for {len(finetuned)} fine-tuned models")
    own_heads = set().union(*(t.runner.head_names for t in tasks))
    names = [
        n
        for n, t in base.items()
        if t.is_floating_point()
        and n not in own_heads
        and any(not torch.equal(f[n], t) for f in finetuned)
    ]
    groups, group_of = tensor_groups(names, mode)
    deltas = [{n: f[n].float() - base[n].float() for n in names} for f in finetuned]
    base_f = {n: t.float() for n, t in base.items() if t.is_floating_point()}
    raw = torch.full((len(tasks), len(groups)), float(init), requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr)
    for t in tasks:
        t.runner.module.eval()
        t.runner.module.requires_grad_(False)
    rng = np.random.default_rng(seed)

    def loss_on(lambdas: torch.Tensor, batches: Sequence[Dataset]) -> torch.Tensor:
        params = merged_params(base_f, deltas, lambdas, group_of)
        total = torch.zeros(())
        for t, part in zip(tasks, batches, strict=True):
            bound = t.runner.bind(params)
            total = total + prediction_entropy(
                t.runner.logits(t.runner.inputs(part, 0, len(part)), bound)
            )
        return total

    with torch.no_grad():
        initial = float(loss_on(raw.clamp(0, 1), [t.data for t in tasks]))
    history = []
    for _ in range(steps):
        batches = [
            t.data.subset(rng.integers(len(t.data), size=min(batch_size, len(t.data))))
            for t in tasks
        ]
        loss = loss_on(raw.clamp(0.0, 1.0), batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(1)
    lambdas = raw.detach().clamp(0.0, 1.0)
    with torch.no_grad():
        final = float(loss_on(lambdas, [t.data for t in tasks]))
    coefficients = {t.name: [float(v) for v in lambdas[i]] for i, t in enumerate(tasks)}
    return AdaMergingResult(mode, groups, coefficients, initial, final, history)


def learn_coefficients(
    backbone: nn.Module,
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    heads: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    **options: Any,
) -> AdaMergingResult:
    """:func:`learn` on in-memory digits backbones (names = the backbone's state names).

    Args:
        backbone: a module of the architecture (its own weights are not used).
        base: ``θ₀``, name -> tensor.
        finetuned: task -> fine-tuned backbone state.
        heads: task -> that task's classification head (kept fixed).
        inputs: task -> unlabeled inputs of that task.
        **options: passed to :func:`learn`.
    """
    from graft.eval.stats import _array_runner

    tasks = [
        Task(t, _array_runner(backbone, heads[t]), Dataset(t, None, (), x=inputs[t].numpy()))
        for t in finetuned
    ]
    return learn(tasks, base, list(finetuned.values()), **options)


def recipe_yaml(
    result: AdaMergingResult, base_model: str, models: Mapping[str, str], *, digits: int = 6
) -> str:
    """A ``task_arithmetic`` recipe that reproduces the learned merge with graft's engine.

    Args:
        result: from :func:`learn`.
        base_model: the base model's path as the recipe should name it.
        models: task -> fine-tuned model path.
        digits: decimals kept per coefficient.
    """
    entries: list[dict[str, Any]] = []
    for task, path in models.items():
        coefs = [round(c, digits) for c in result.coefficients[task]]
        if result.mode == "task":
            weight: Any = coefs[0]
        elif result.mode == "layer":
            ranked = sorted(zip(result.groups, coefs, strict=True), key=lambda gc: -len(gc[0]))
            weight = [{"filter": g, "value": c} for g, c in ranked]
            weight.append({"value": round(float(np.mean(coefs)), digits) if coefs else 0.0})
        else:
            weight = [
                {"filter": g, "value": c} if g != OUTSIDE else {"value": c}
                for g, c in zip(result.groups, coefs, strict=True)
            ]
        entries.append({"model": str(path), "parameters": {"weight": weight}})
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base_model),
        "parameters": {"lambda": 1.0, "normalize": False},
        "models": entries,
    }
    header = (
        f"# AdaMerging ({result.mode}-wise), entropy {result.entropy_initial:.4f} -> "
        f"{result.entropy_final:.4f}\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def adamerging_zoo(
    zoo: Any,
    tasks: Sequence[str] | None = None,
    *,
    mode: str = "layer",
    split: str = "test",
    **options: Any,
) -> tuple[AdaMergingResult, str]:
    """AdaMerging over a digits zoo: the fine-tuned backbones of ``tasks`` (default: all).

    Args:
        zoo: a ``graft.zoo.build.Zoo`` (or its root folder).
        tasks: which fine-tunes to merge.
        mode: ``"task"``, ``"layer"`` or ``"block"``.
        split: whose inputs (labels unused) drive the entropy; the paper's is ``"test"``.
        **options: passed to :func:`learn` (steps, lr, init, batch_size, seed).

    Returns:
        The result and the recipe YAML (paths as stored in the zoo).
    """
    from graft.eval.stats import _as_zoo
    from graft.io import load_state_dict
    from graft.models.digits_net import load_backbone, load_head
    from graft.zoo.tasks import task_data

    zoo = _as_zoo(zoo)
    tasks = list(tasks or zoo.finetuned)
    backbone, _ = load_backbone(zoo.base)
    base = load_state_dict(zoo.base)
    finetuned = {t: load_state_dict(zoo.finetuned[t]) for t in tasks}
    heads = {t: load_head(zoo.heads[t]) for t in tasks}
    inputs = {t: task_data(t, split, seed=zoo.seed)[0] for t in tasks}
    result = learn_coefficients(backbone, base, finetuned, heads, inputs, mode=mode, **options)
    text = recipe_yaml(result, str(zoo.base), {t: str(zoo.finetuned[t]) for t in tasks})
    return result, text
