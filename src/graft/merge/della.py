"""DELLA (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling").

Per tensor and per model, MagPrune: within each row of ``δᵢ``, rank entries by ``|δᵢ|``
(0 = smallest) and keep entry of rank ``r`` with probability
``p = density − ε + 2ε·r/(n−1)``, rising linearly from ``density − ε`` to ``density + ε``;
kept entries are divided by their own ``p``. Then:

* ``della``: TIES sign election and disjoint merge (mean form by default);
* ``della_linear``: task arithmetic on the sparse deltas.

Conventions that change results:

* Rows: a tensor of two or more dims is viewed as ``(shape[0], -1)``; a 0-d or 1-d tensor
  is one row. (mergekit ranks along dim 1, which is the same for 2-D weights.) A row of
  one entry gets ``p = density``. Of two equal magnitudes, the lower index ranks lower.
* ``rescale`` (default true). ``rescale_mode: paper`` (default) divides each kept entry by
  its own ``p``, the paper's rule. ``rescale_mode: l1`` is mergekit 0.1.5's: one factor per
  tensor matching the dense delta's L1 norm.
* ``density: 1`` returns the delta unchanged. Otherwise ``density − ε`` must be > 0 and
  ``density + ε`` ≤ 1 (mergekit also rejects ``density + ε = 1``).
* Masks come from the seeded ``generator`` in model order, as for DARE.
* ``normalize`` defaults: ``della`` true, ``della_linear`` false (mergekit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from graft.merge import _fused
from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import (
    combine,
    family_params,
    finish,
    l1_rescale,
    per_model,
    rescale_mode_param,
    task_vectors,
    unit_interval_check,
    widen,
)
from graft.merge.dare import dare_mask


def della_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability, linear in magnitude rank within each row.

    Args:
        delta: one model's delta.
        density: mean keep probability.
        epsilon: half-width of the probability range.

    Returns:
        Probabilities, same shape and dtype as ``delta``.
    """
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1).to(delta.dtype)
    frac = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * frac).view_as(delta)


def della_drop(
    delta: torch.Tensor,
    keep: torch.Tensor,
    probs: torch.Tensor,
    *,
    rescale: bool = True,
    rescale_mode: str = "paper",
) -> torch.Tensor:
    """Apply a keep-mask and rescale the survivors.

    Args:
        delta: one model's delta.
        keep: boolean mask, true where the entry survives.
        probs: the keep probability of each entry.
        rescale: rescale the kept entries.
        rescale_mode: ``"paper"`` divides each kept entry by its ``p``; ``"l1"`` matches
            the L1 norm of ``delta`` (mergekit).

    Returns:
        The sparse delta.
    """
    kept = torch.where(keep, delta, 0)
    if not rescale:
        return kept
    if rescale_mode == "l1":
        return l1_rescale(kept, delta)
    return kept / probs


def _range_problem(density: float, epsilon: float) -> str | None:
    if density - epsilon <= 0 or density + epsilon > 1:
        return (
            f"della needs 0 < density - epsilon and density + epsilon <= 1, got "
            f"density={density}, epsilon={epsilon}; lower epsilon or move density"
        )
    return None


def _check(density: float, epsilon: float) -> None:
    problem = _range_problem(density, epsilon)
    if problem:
        raise ValueError(problem)


def _check_params(params: Mapping[str, Any], models: Sequence[str]) -> str | None:
    """Every model's ``density ± epsilon`` inside (0, 1] (density 1 keeps the delta)."""
    for density, epsilon, model in zip(params["density"], params["epsilon"], models, strict=True):
        problem = None if density >= 1 else _range_problem(density, epsilon)
        if problem:
            return f"model {model}: {problem}"
    return None


def della_sparsify(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    *,
    rescale: bool = True,
    rescale_mode: str = "paper",
) -> torch.Tensor:
    """MagPrune one delta; ``density >= 1`` returns it unchanged.

    Raises:
        ValueError: when ``density ± epsilon`` leaves (0, 1].
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    _check(density, epsilon)
    probs = della_keep_probs(delta, density, epsilon)
    draw_device = generator.device if generator is not None else delta.device
    u = torch.rand(delta.shape, generator=generator, device=draw_device).to(delta.device)
    keep = u < probs
    return della_drop(delta, keep, probs, rescale=rescale, rescale_mode=rescale_mode)


def _magprune(
    tensor: torch.Tensor,
    base: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
) -> _fused.Sparsifier | None:
    """`della_sparsify` as the fused kernel's inputs: the same probabilities and draws."""
    if density >= 1:
        return _fused.Sparsifier(_fused.DENSE)
    _check(density, epsilon)
    kept = _fused.della_probs(tensor, base, density, epsilon, generator)
    if kept is not None:  # probabilities and draws in one pass; +0 where dropped
        return _fused.Sparsifier(_fused.PROB, probs=kept)
    probs = _fused.della_probs(tensor, base, density, epsilon)
    if probs is None:
        return None
    keep = dare_mask(probs.shape, probs, generator, probs.device)  # torch.rand's draws
    return _fused.Sparsifier(_fused.PROB, mask=keep, probs=probs)


def _della(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    elect: bool,
    weight: Sequence[float],
    density: Sequence[float] | None,
    epsilon: Sequence[float] | None,
    normalize: bool,
    rescale: bool,
    rescale_mode: str,
    scale: float,
    generator: torch.Generator | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    n = len(tensors)
    pairs = list(zip(per_model(density, n, 1.0), per_model(epsilon, n, 0.15), strict=True))
    if _fused.random_mask_usable(
        tensors, base, generator, elect=elect, rescale=rescale, rescale_mode=rescale_mode
    ):
        start_state = generator.get_state()
        sparse = [
            _magprune(t, base, p, eps, generator)
            for t, (p, eps) in zip(tensors, pairs, strict=True)
        ]
        if all(s is not None for s in sparse):
            out = _fused.merge(
                tensors, base, sparse, weight=weight, normalize=normalize, scale=scale,
                rescale=rescale, out_dtype=out_dtype,
            )  # fmt: skip
            if out is not None:
                return out
        generator.set_state(start_state)  # the torch path draws the same masks again
    tensors, base = widen(tensors, base)
    deltas = task_vectors(tensors, base)
    for i, (p, eps) in enumerate(pairs):
        deltas[i] = della_sparsify(
            deltas[i], p, eps, generator, rescale=rescale, rescale_mode=rescale_mode
        )
    merged = combine(deltas, weight, elect=elect, normalize=normalize)
    return finish(base, merged, scale, out_dtype)


def della(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    normalize: bool = True,
    rescale: bool = True,
    rescale_mode: str = "paper",
    scale: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """MagPrune each delta, then TIES sign election and disjoint merge.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, mean keep probability (default 1.0: no drop).
        epsilon: per model, half-width of the keep-probability range (default 0.15).
        normalize: disjoint mean (true) or disjoint sum (false).
        rescale: rescale kept entries.
        rescale_mode: ``"paper"`` (1/p per entry) or ``"l1"`` (mergekit).
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.
        generator: source of the random masks.
        out_dtype: the result's dtype (default float32), rounded as a cast rounds.

    Returns:
        The merged tensor.
    """
    return _della(
        tensors,
        base,
        elect=True,
        weight=weight,
        density=density,
        epsilon=epsilon,
        normalize=normalize,
        rescale=rescale,
        rescale_mode=rescale_mode,
        scale=scale,
        generator=generator,
        out_dtype=out_dtype,
    )


def della_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: str = "paper",
    scale: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MagPrune each delta, then task arithmetic.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, mean keep probability (default 1.0: no drop).
        epsilon: per model, half-width of the keep-probability range (default 0.15).
        normalize: divide the weighted sum by ``Σ wᵢ``.
        rescale: rescale kept entries.
        rescale_mode: ``"paper"`` (1/p per entry) or ``"l1"`` (mergekit).
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.
        generator: source of the random masks.

    Returns:
        The merged tensor.
    """
    return _della(
        tensors,
        base,
        elect=False,
        weight=weight,
        density=density,
        epsilon=epsilon,
        normalize=normalize,
        rescale=rescale,
        rescale_mode=rescale_mode,
        scale=scale,
        generator=generator,
    )


_EPSILON = Param(
    "epsilon",
    float,
    0.15,
    per_model=True,
    doc="keep probability ranges over density ± epsilon by magnitude rank",
    check=unit_interval_check("epsilon"),
)
_RESCALE_DOC = "rescale kept entries (see rescale_mode) so the delta is unbiased"
_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"

DELLA_SPEC = MethodSpec(
    name="della",
    fn=della,
    summary="magnitude-ranked random drop, rescale, TIES sign election and merge",
    params=(
        *family_params(normalize=True, rescale=True, rescale_doc=_RESCALE_DOC),
        _EPSILON,
        rescale_mode_param(),
    ),
    base="required",
    native_inputs=True,
    native_output=True,
    uses_seed=True,
    order_independent=False,
    paper=_PAPER,
    check_params=_check_params,
)

DELLA_LINEAR_SPEC = MethodSpec(
    name="della_linear",
    fn=della_linear,
    summary="magnitude-ranked random drop, rescale, add weighted sum to base",
    params=(
        *family_params(normalize=False, rescale=True, rescale_doc=_RESCALE_DOC),
        _EPSILON,
        rescale_mode_param(),
    ),
    base="required",
    uses_seed=True,
    order_independent=False,
    paper=_PAPER,
    check_params=_check_params,
)
