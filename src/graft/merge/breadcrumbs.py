"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task
Model Merging with Sparse Masks", ECCV 2024).

Per tensor and per model, with ``N = numel``: rank the entries of ``δᵢ`` by ``|δᵢ|``,
drop the largest ``int(gamma·N)`` (outliers) and then the smallest, so that exactly
``int(density·N)`` entries remain. Then:

* ``breadcrumbs``: task arithmetic on the masked deltas;
* ``breadcrumbs_ties``: TIES sign election and disjoint merge on them.

Conventions that change results (all as mergekit's ``magnitude_outliers``):

* The kept entries are the ``int(density·N)`` largest *after* removing the top
  ``int(gamma·N)``; with ``int(gamma·N) = 0`` nothing is removed from the top (no
  empty-slice wrap-around), so the method reduces to a plain top-k.
* When ``density + gamma`` leaves too few entries (``int(density·N) + int(gamma·N) > N``),
  fewer outliers are removed so that ``int(density·N)`` still remain.
* ``density: 1`` keeps everything, whatever ``gamma``.
* Ties in magnitude go to the higher flat index (stable ascending sort).
* ``rescale: true`` (default false) scales each masked delta to the L1 norm of the dense
  one. ``normalize`` defaults to false for both variants, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge import _fused
from graft.merge._select import top_k_mask
from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import (
    combine,
    family_params,
    finish,
    l1_rescale,
    per_model,
    task_vectors,
    unit_interval_check,
    widen,
)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep-mask that drops the top ``gamma`` fraction and the smallest entries.

    Args:
        delta: one model's delta.
        density: fraction of entries that remain.
        gamma: fraction of the largest-magnitude entries removed first.

    Returns:
        Boolean mask, same shape as ``delta``.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n_keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    # Ascending ranks [n_bottom, n_bottom + n_keep) = the top (n - n_bottom) minus the top
    # n_top, both with ties resolved as a stable ascending sort does.
    mag = delta.abs()
    upper = top_k_mask(mag, n - n_bottom, ties="high")
    return upper & ~top_k_mask(mag, n - n_bottom - n_keep, ties="high")


def _band(density: float, gamma: float, n: int) -> _fused.Sparsifier:
    """`outlier_mask` as the fused kernel's two cuts (top ``k`` minus top ``k2``)."""
    if density >= 1:
        return _fused.Sparsifier(_fused.DENSE)
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    return _fused.Sparsifier(_fused.BAND, k=n - n_bottom, k2=n - n_bottom - n_keep)


def _breadcrumbs(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    elect: bool,
    weight: Sequence[float],
    density: Sequence[float] | None,
    gamma: Sequence[float] | None,
    normalize: bool,
    rescale: bool,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    n = len(tensors)
    densities, gammas = per_model(density, n, 1.0), per_model(gamma, n, 0.01)
    if elect and not rescale:
        size = base.numel()
        sparse = [_band(p, g, size) for p, g in zip(densities, gammas, strict=True)]
        out = _fused.merge(
            tensors, base, sparse, weight=weight, normalize=normalize, scale=scale,
            out_dtype=out_dtype,
        )  # fmt: skip
        if out is not None:
            return out
    tensors, base = widen(tensors, base)
    deltas = task_vectors(tensors, base)
    for i, (p, g) in enumerate(zip(densities, gammas, strict=True)):
        if p >= 1:
            continue
        masked = torch.where(outlier_mask(deltas[i], p, g), deltas[i], 0)
        deltas[i] = l1_rescale(masked, deltas[i]) if rescale else masked
    merged = combine(deltas, weight, elect=elect, normalize=normalize)
    return finish(base, merged, scale, out_dtype)


def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    scale: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Task arithmetic on deltas with outliers and small entries removed.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, fraction of entries that remain (default 1.0).
        gamma: per model, fraction of largest entries removed (default 0.01).
        normalize: divide the weighted sum by ``Σ wᵢ``.
        rescale: scale each masked delta to its dense L1 norm.
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.

    Returns:
        The merged tensor.
    """
    return _breadcrumbs(
        tensors,
        base,
        elect=False,
        weight=weight,
        density=density,
        gamma=gamma,
        normalize=normalize,
        rescale=rescale,
        scale=scale,
    )


def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    scale: float = 1.0,
    int8_mask: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Breadcrumbs masking, then TIES sign election and disjoint merge.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, fraction of entries that remain (default 1.0).
        gamma: per model, fraction of largest entries removed (default 0.01).
        normalize: disjoint mean (true) or disjoint sum (false, mergekit's default).
        rescale: scale each masked delta to its dense L1 norm.
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.
        out_dtype: the result's dtype (default float32), rounded as a cast rounds.

    Returns:
        The merged tensor.
    """
    return _breadcrumbs(
        tensors,
        base,
        elect=True,
        weight=weight,
        density=density,
        gamma=gamma,
        normalize=normalize,
        rescale=rescale,
        scale=scale,
        out_dtype=out_dtype,
    )


_GAMMA = Param(
    "gamma",
    float,
    0.01,
    per_model=True,
    doc="fraction of largest-magnitude delta entries removed",
    check=unit_interval_check("gamma"),
)
_RESCALE_DOC = "scale each masked delta to its dense L1 norm (mergekit)"
_PAPER = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"

BREADCRUMBS_SPEC = MethodSpec(
    name="breadcrumbs",
    fn=breadcrumbs,
    summary="drop largest and smallest delta entries, add weighted sum to base",
    params=(*family_params(normalize=False, rescale=False, rescale_doc=_RESCALE_DOC), _GAMMA),
    base="required",
    paper=_PAPER,
)

BREADCRUMBS_TIES_SPEC = MethodSpec(
    name="breadcrumbs_ties",
    fn=breadcrumbs_ties,
    summary="drop largest and smallest delta entries, TIES sign election and merge",
    params=(*family_params(normalize=False, rescale=False, rescale_doc=_RESCALE_DOC), _GAMMA),
    base="required",
    native_inputs=True,
    native_output=True,
    paper=_PAPER,
)
