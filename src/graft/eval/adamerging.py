"""AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR): learn the task-arithmetic coefficients by entropy minimisation.

The merged backbone is ``θ = θ₀ + Σᵢ λᵢ δᵢ`` (task-wise: one ``λᵢ`` per task) or
``θ = θ₀ + Σᵢ λᵢ,ₗ δᵢ,ₗ`` (layer-wise: one ``λᵢ,ₗ`` per task per residual block ``l``,
plus one per task shared by every tensor outside the blocks: embeddings, final norm).
The coefficients start at 0.3 and are learned with Adam by minimising, summed over the
tasks, the mean Shannon entropy of task t's head on the merged features of task t's
**unlabeled test inputs** — the paper's test-time setting: labels are never read, but
the inputs are the ones the merged model is then scored on. Use a validation split
instead for a clean held-out number.

Conventions that change results (paper defaults where the paper gives one):

* Adam, learning rate 1e-3, 500 steps, 16 inputs per task per step, drawn at random
  with a fixed seed; coefficients clamped to ``[0, 1]`` in the forward pass, as the
  authors' code does.
* The final model is an ordinary recipe: :func:`recipe_yaml` writes ``task_arithmetic``
  with ``lambda: 1`` and each model's ``weight`` as its learned coefficient(s) — for the
  layer-wise form a list of ``{filter: "blocks.<l>.", value: λ}`` conditionals and a last
  filter-less entry for the tensors outside the blocks. graft's filters are substrings of
  the tensor name; ``"blocks.1."`` does not match ``blocks.10.*`` (the ``0`` breaks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn
from torch.func import functional_call

from graft.plan.arch import split_block_name

MODES = ("task", "layer")
OUTSIDE = "*"  # group label of the tensors outside the blocks (layer-wise)


@dataclass
class AdaMergingResult:
    """Learned coefficients.

    Attributes:
        mode: ``"task"`` or ``"layer"``.
        groups: layer-wise, the block filters (``"blocks.0."``...) then ``"*"`` for the
            tensors outside the blocks; task-wise, ``["*"]``.
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

    Layer-wise, a block tensor's group is its block filter (``prefix + index + "."``, e.g.
    ``"blocks.3."``), sorted by index; every other tensor falls in the last group ``"*"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "task":
        return [OUTSIDE], {n: 0 for n in names}
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


def learn_coefficients(
    backbone: nn.Module,
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    heads: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    *,
    mode: str = "layer",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    batch_size: int = 16,
    seed: int = 0,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients by minimising prediction entropy.

    Args:
        backbone: a module of the architecture (its own weights are not used).
        base: ``θ₀``, name -> tensor (the backbone's state-dict names).
        finetuned: task -> fine-tuned backbone state.
        heads: task -> that task's classification head (kept fixed).
        inputs: task -> unlabeled inputs of that task.
        mode: ``"task"`` or ``"layer"``.
        steps: Adam steps.
        lr: Adam learning rate.
        init: initial value of every coefficient.
        batch_size: inputs per task per step.
        seed: seed of the batch draws.

    Returns:
        The learned coefficients and the entropy before and after.
    """
    tasks = list(finetuned)
    names = [n for n, t in base.items() if t.is_floating_point()]
    groups, group_of = tensor_groups(names, mode)
    deltas = [{n: (finetuned[t][n].float() - base[n].float()) for n in names} for t in tasks]
    base_f = {n: (t.float() if t.is_floating_point() else t) for n, t in base.items()}
    raw = torch.full((len(tasks), len(groups)), float(init), requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr)
    for module in (backbone, *heads.values()):
        module.eval()
        module.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def loss_on(lambdas: torch.Tensor, batches: Mapping[str, torch.Tensor]) -> torch.Tensor:
        params = merged_params(base_f, deltas, lambdas, group_of)
        total = torch.zeros(())
        for task, x in batches.items():
            feats = functional_call(backbone, params, (x,))
            total = total + prediction_entropy(heads[task](feats))
        return total

    with torch.no_grad():
        initial = float(loss_on(raw.clamp(0, 1), inputs))
    history = []
    for _ in range(steps):
        batches = {
            t: x[torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)]
            for t, x in inputs.items()
        }
        loss = loss_on(raw.clamp(0.0, 1.0), batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    lambdas = raw.detach().clamp(0.0, 1.0)
    with torch.no_grad():
        final = float(loss_on(lambdas, inputs))
    coefficients = {t: [float(v) for v in lambdas[i]] for i, t in enumerate(tasks)}
    return AdaMergingResult(mode, groups, coefficients, initial, final, history)


def recipe_yaml(
    result: AdaMergingResult, base_model: str, models: Mapping[str, str], *, digits: int = 6
) -> str:
    """A ``task_arithmetic`` recipe that reproduces the learned merge with graft's engine.

    Args:
        result: from :func:`learn_coefficients`.
        base_model: the base model's path as the recipe should name it.
        models: task -> fine-tuned model path.
        digits: decimals kept per coefficient.
    """
    entries: list[dict[str, Any]] = []
    for task, path in models.items():
        coefs = [round(c, digits) for c in result.coefficients[task]]
        if result.mode == "task":
            weight: Any = coefs[0]
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
        mode: ``"task"`` or ``"layer"``.
        split: whose inputs (labels unused) drive the entropy; the paper's is ``"test"``.
        **options: passed to :func:`learn_coefficients` (steps, lr, init, batch_size, seed).

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
