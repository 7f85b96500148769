"""PLeaS (Nasery, Hayase, Koh & Oh, "PLeaS: Merging Models with Permutations and Least
Squares", CVPR 2025, arXiv:2407.02447): merge two models trained from *different*
initialisations.

Steps, as in the paper:

1. **Permute** (§3.1). Find, per permutation group (`graft.align.spec`: residual stream,
   attention heads, MLP/FFN hidden units), the permutation π that aligns B's units to A's:
   activation matching (correlation on the data) or weight matching (Git Re-Basin
   coordinate descent), `graft.align.matching`. B is permuted into A's basis; A's basis is
   the merged model's.
2. **Partial merge** (§3.2, the paper's budget). In each *partial* group of ``n`` units a
   fraction ``ratio`` is merged — the ``k = round(ratio·n)`` matched pairs with the highest
   matching score — and the other ``n − k`` units are kept from each model, so the merged
   layer has ``k + 2(n − k)`` units, laid out ``[merged | A only | B only]``. Only the
   MLP hidden layer (GraftDigitsNet) and the FFN intermediate (BERT) are partial: their
   width is the config's ``intermediate_size``, so a wider merged model is still a
   standard checkpoint. The residual stream and attention are always merged fully
   (``ratio = 1`` there): a wider residual stream would change what every LayerNorm
   averages over, more heads would change BERT's head size. Before step 3 the weights
   are the "zip" of the two models: merged units get the weighted average, kept units
   their own model's rows, and a layer reading a partial group reads merged units with
   the average and kept units scaled by their model's weight (so it sums the two models'
   contributions).
3. **Least squares** (§3.3). Layer by layer in forward order, each Linear of the merged
   model (``W``, ``b``) is set to

       ``argmin_{W,b} ‖[X_M 1][W b]ᵀ − T‖² + λ‖W‖²``,  ``T = Σᵢ wᵢ · Πᵢ Yᵢ``

   where ``X_M`` are the layer's inputs *in the merged model* (all earlier layers already
   solved), ``Yᵢ`` the layer's outputs in model ``i`` (B permuted), and ``Πᵢ`` the
   partial layout: a merged unit's target is the ``w``-weighted mean of both models'
   outputs, a kept unit's target is its own model's output. Solved in closed form,
   ``[W b]ᵀ = (G + λD)⁻¹ [X_M 1]ᵀT`` with ``G`` the Gram of ``[X_M 1]`` summed over every
   (non-padding) token row, in float64; the paper fits the same objective by gradient
   descent. The layers of one stage (BERT's Q, K, V) share ``X_M``.

Conventions that change results:

* Ridge: ``λ = ridge · mean(diag(X_Mᵀ X_M))`` (scale-free), default ``ridge = 1e-4``; the
  bias is not penalised (``D`` is the identity without its bias entry).
* Averaging weights: ``weight`` is A's share ``w_A`` (default 0.5), ``w_B = 1 − w_A``; the
  same weights blend targets and every tensor the least squares does not solve
  (LayerNorms, embedding tables, the permuted average of step 2).
* Targets are each Linear's own outputs (pre-activation, pre-residual), so the merged
  residual stream tracks the weighted mean of the models' streams.
* Heads (optional, e.g. the digits zoo's task heads): one more least-squares layer from
  the merged model's features to the weighted mean of the two heads' logits (logits do
  not depend on the basis). Without least squares (``solve=False``) the head is the
  weighted average of A's head and B's head with permuted input columns.
* Attention heads are matched as wholes, Q/K and V/O with their own within-head
  permutations (`graft.align.matching`); the least squares then treats Q, K and V as
  ordinary Linears.
* ``solve=False`` gives the permute-and-average baselines (Git Re-Basin's weight or
  activation matching + average, or ZipIt-style partial merges when ``ratio < 1``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from graft.align import (
    PermutationSpec,
    activation_matching,
    correlations,
    permute,
    weight_matching,
)
from graft.align._hooks import capture, rows, run

DEFAULT_RIDGE = 1e-4
MATCHES = ("activation", "weight")

Features = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


# --- the math ---------------------------------------------------------------------------


class Normal:
    """Running normal equations of ``[X 1] Θ ≈ T`` over row batches (float64)."""

    def __init__(self, n_in: int, n_out: int):
        f64 = torch.float64
        self.gram = torch.zeros(n_in + 1, n_in + 1, dtype=f64)
        self.cross = torch.zeros(n_in + 1, n_out, dtype=f64)
        self.tt = 0.0  # Σ‖T‖²
        self.ts = torch.zeros(n_out, dtype=f64)  # Σ T
        self.rows = 0

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        t = t.double()
        self.gram += xa.T @ xa
        self.cross += xa.T @ t
        self.tt += float((t * t).sum())
        self.ts += t.sum(0)
        self.rows += x.shape[0]


def least_squares(
    gram: torch.Tensor, cross: torch.Tensor, *, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge solution of ``[X 1][W b]ᵀ ≈ T`` from ``G = [X 1]ᵀ[X 1]`` and
    ``[X 1]ᵀT`` (module docstring, step 3).

    Returns:
        ``(W, b)`` with ``W`` ``(out, in)`` and ``b`` ``(out,)``, float64.
    """
    n = gram.shape[0] - 1
    lam = ridge * float(gram.diagonal()[:n].mean()) if n else 0.0
    lhs = gram.clone()
    lhs.diagonal()[:n] += lam
    theta, info = torch.linalg.solve_ex(lhs, cross)
    if int(info) != 0 or not bool(torch.isfinite(theta).all()):
        theta = torch.linalg.lstsq(lhs, cross, driver="gelsd").solution
    return theta[:n].T.contiguous(), theta[n].contiguous()


def fit_error(normal: Normal, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """``‖[X 1]Θ − T‖² / ‖T − mean(T)‖²`` (1 − R²) of a solution, from the running sums."""
    theta = torch.cat([weight.T, bias[None]], 0).double()
    sse = float((theta * (normal.gram @ theta)).sum() - 2 * (theta * normal.cross).sum())
    sse += normal.tt
    sst = normal.tt - float((normal.ts**2).sum()) / max(normal.rows, 1)
    return max(sse, 0.0) / sst if sst > 0 else 0.0


def partial_layout(scores: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged, kept)`` unit indices (A's basis, sorted): the ``round(ratio·n)`` pairs
    with the highest matching score are merged, the rest kept from each model."""
    n = len(scores)
    k = int(round(ratio * n))
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:k].sort().values, order[k:].sort().values


def zip_tensor(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    partial: Sequence[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = (),
) -> torch.Tensor:
    """The step-2 merge of one tensor, one per model (all permuted into A's basis): the
    weighted average, with each partial axis laid out ``[merged | A only | B only | …]``
    (module docstring)."""
    pairs = list(zip(weights, tensors, strict=True))
    if not partial:
        return sum(w * t for w, t in pairs)
    ((axis, (m, s)),) = partial  # a Linear has at most one partial axis in these specs
    pick = lambda t, i: t.index_select(axis, i)  # noqa: E731
    merged = sum(w * pick(t, m) for w, t in pairs)
    if axis == 0:  # output units: kept rows are their model's own
        return torch.cat([merged, *(pick(t, s) for _, t in pairs)], axis)
    return torch.cat([merged, *(w * pick(t, s) for w, t in pairs)], axis)


# --- the driver -------------------------------------------------------------------------


@dataclass
class PleasResult:
    """A PLeaS merge.

    Attributes:
        state: the merged tensors, named as the input modules' state dicts.
        perms: per group, the permutation applied to B (``B[p[j]]`` ↦ unit ``j``).
        widths: per partial group, its merged width (``k + N(n − k)`` for N models).
        errors: per solved layer, ``1 − R²`` of its least-squares fit on the data.
        head: the merged head ``(weight, bias)`` when heads were given.
        all_perms: the permutations of every model after A, in order (``all_perms[0]``
            is ``perms``).
    """

    state: dict[str, torch.Tensor]
    perms: dict[str, torch.Tensor]
    widths: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    all_perms: list[dict[str, torch.Tensor]] = field(default_factory=list)


def pleas(
    module_a: nn.Module,
    module_b: nn.Module,
    spec: PermutationSpec,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    match: str = "activation",
    ratio: float = 1.0,
    weight: float = 0.5,
    ridge: float = DEFAULT_RIDGE,
    solve: bool = True,
    heads: tuple[nn.Linear, nn.Linear] | None = None,
    features: Features | None = None,
    progress: Callable[[int], None] | None = None,
) -> PleasResult:
    """Merge ``module_b`` into ``module_a`` (module docstring).

    Args:
        module_a, module_b: the two models (same architecture and sizes), in eval mode.
        spec: their permutation spec (`graft.align.permutation_spec`).
        batches: model inputs (``module(**inputs)``); an ``attention_mask`` marks tokens.
        match: ``"activation"`` or ``"weight"``.
        ratio: fraction of each partial group's units merged (1: all).
        weight: A's share of every average and target (B gets ``1 − weight``).
        ridge: relative ridge of the least squares.
        solve: False stops after steps 1-2 (permute and average).
        heads: A's and B's linear heads on the models' features, merged too.
        features: ``features(module, inputs)``, the features the heads read
            (default: ``module(**inputs)``).
        progress: called with 1 after each matching and each layer solved.

    Returns:
        The merge (`PleasResult`).
    """
    return pleas_many(
        [module_a, module_b],
        spec,
        batches,
        match=match,
        ratio=ratio,
        weights=[weight, 1 - weight],
        ridge=ridge,
        solve=solve,
        heads=heads,
        features=features,
        progress=progress,
    )


def pleas_many(
    modules: Sequence[nn.Module],
    spec: PermutationSpec,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    match: str = "activation",
    ratio: float = 1.0,
    weights: Sequence[float] | None = None,
    ridge: float = DEFAULT_RIDGE,
    solve: bool = True,
    heads: Sequence[nn.Linear] | None = None,
    features: Features | None = None,
    progress: Callable[[int], None] | None = None,
) -> PleasResult:
    """PLeaS over N ≥ 2 models, merged into the first one's basis.

    The paper merges two models; graft's extension to N keeps every step and anchors them
    on model 1 (A): each other model is matched to A and permuted into A's basis (no
    model is matched to another non-anchor one), every average and least-squares target
    is the ``weights``-weighted mean over all N models, and a partial group merges the
    ``round(ratio·n)`` units whose matches score highest on average over the N − 1
    matchings, keeping the other units from every model (``[merged | A only | B only |
    C only …]``, width ``k + N(n − k)``). With two models this is `pleas` exactly.

    Args:
        modules: the models (same architecture and sizes), in eval mode; A first.
        weights: each model's share (default equal); they must sum to 1.
        heads: one linear head per model, merged too.
        (the rest as `pleas`; ``progress`` is called once per matching.)
    """
    modules = list(modules)
    n = len(modules)
    if n < 2:
        raise ValueError(f"PLeaS merges at least two models, got {n}")
    ws = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    if len(ws) != n or abs(sum(ws) - 1.0) > 1e-6:
        raise ValueError(f"PLeaS needs one weight per model summing to 1, got {ws}")
    if heads is not None and len(heads) != n:
        raise ValueError(f"PLeaS needs one head per model, got {len(heads)} for {n}")
    batches = list(batches)
    tick = progress or (lambda n: None)
    anchor = modules[0]
    states = [m.state_dict() for m in modules]
    all_perms, all_scores = [], []
    for other, state in zip(modules[1:], states[1:], strict=True):
        if match == "weight":
            perms, scores = weight_matching(spec, states[0], state)
        else:
            perms, scores = activation_matching(spec, correlations(spec, anchor, other, batches))
        all_perms.append(perms)
        all_scores.append(scores)
        tick(1)
    aligned = [states[0]] + [
        permute(st, spec, p) for st, p in zip(states[1:], all_perms, strict=True)
    ]
    models = [anchor]
    for module, state in zip(modules[1:], aligned[1:], strict=True):
        model = copy.deepcopy(module)
        model.load_state_dict(state)
        models.append(model)
    layouts = {}
    if ratio < 1:
        for g, grp in spec.groups.items():
            if grp.partial:
                mean = torch.stack([sc[g].double() for sc in all_scores]).mean(0)
                layouts[g] = partial_layout(mean, ratio)
    state = {}
    for name, a in states[0].items():
        part = [(ax, layouts[g]) for g, ax in spec.axes_of(name) if g in layouts]
        if a.is_floating_point():
            state[name] = zip_tensor([al[name] for al in aligned], ws, part)
        else:
            state[name] = a
    merged = copy.deepcopy(anchor)
    _load(merged, state)
    widths = {g: len(m) + n * len(s) for g, (m, s) in layouts.items()}
    result = PleasResult(state, all_perms[0], widths, all_perms=all_perms)
    if solve:
        for stage in spec.stages:
            _solve_stage(merged, models, spec, stage, layouts, batches, ws, ridge, result)
            tick(1)
    if heads is not None:
        result.head = _merge_heads(
            merged, modules, heads, all_perms, batches, ws, ridge, solve, features, result
        )
        tick(1)
    result.state = {k: t.detach().clone() for k, t in merged.state_dict().items()}
    return result


def _load(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Set every tensor of ``state`` on ``module``, resizing Linears where it is wider."""
    for name, t in state.items():
        owner, _, attr = name.rpartition(".")
        mod = module.get_submodule(owner)
        current = getattr(mod, attr)
        if isinstance(current, nn.Parameter):
            setattr(
                mod, attr, nn.Parameter(t.detach().clone().to(current.dtype), requires_grad=False)
            )
        else:
            setattr(mod, attr, t.detach().clone())
        if isinstance(mod, nn.Linear) and attr == "weight":
            mod.out_features, mod.in_features = t.shape


def _target(name, spec, layouts, ys, ws) -> torch.Tensor:
    groups = [g for g, ax in spec.axes_of(f"{name}.weight") if ax == 0 and g in layouts]
    if not groups:
        return sum(w * y for w, y in zip(ws, ys, strict=True))
    m, s = layouts[groups[0]]
    return torch.cat(
        [sum(w * y[:, m] for w, y in zip(ws, ys, strict=True)), *(y[:, s] for y in ys)], 1
    )


def _solve_stage(merged, models, spec, stage, layouts, batches, ws, ridge, result):
    sites_in = [(n, "in") for n in stage]
    sites_out = [(n, "out") for n in stage]
    normals: dict[str, Normal] = {}
    with contextlib.ExitStack() as stack:
        got_m = stack.enter_context(capture(merged, sites_in, stop=True))
        got = [stack.enter_context(capture(m, sites_out, stop=True)) for m in models]
        for inputs in batches:
            run(merged, inputs, got_m)
            for model, store in zip(models, got, strict=True):
                run(model, inputs, store)
            mask = inputs.get("attention_mask")
            for n in stage:
                x = rows(got_m[(n, "in")], mask)
                t = _target(n, spec, layouts, [rows(g[(n, "out")], mask) for g in got], ws)
                normals.setdefault(n, Normal(x.shape[1], t.shape[1])).add(x, t)
    for n in stage:
        W, b = least_squares(normals[n].gram, normals[n].cross, ridge=ridge)
        result.errors[n] = fit_error(normals[n], W, b)
        lin = merged.get_submodule(n)
        _load(lin, {"weight": W.to(lin.weight.dtype), "bias": b.to(lin.weight.dtype)})


def _merge_heads(merged, modules, heads, all_perms, batches, ws, ridge, solve, features, result):
    if not solve:  # the heads' input columns follow each model's residual permutation
        cols = [None] + [p["residual"] for p in all_perms]
        weight = sum(
            w * (h.weight if c is None else h.weight.index_select(1, c))
            for w, h, c in zip(ws, heads, cols, strict=True)
        )
        bias = sum(w * h.bias for w, h in zip(ws, heads, strict=True))
        return weight.detach().clone(), bias.detach().clone()
    feats = features or (lambda module, inputs: module(**inputs))
    normal = None
    with torch.no_grad():
        for inputs in batches:
            x = feats(merged, inputs)
            t = sum(w * h(feats(m, inputs)) for w, h, m in zip(ws, heads, modules, strict=True))
            normal = normal or Normal(x.shape[1], t.shape[1])
            normal.add(x, t)
    W, b = least_squares(normal.gram, normal.cross, ridge=ridge)
    result.errors["head"] = fit_error(normal, W, b)
    return W.float(), b.float()
