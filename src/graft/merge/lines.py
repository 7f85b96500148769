"""LiNeS: Layer-increasing Network Scaling (Wang et al. 2025, "LiNeS: Post-training Layer
Scaling Prevents Forgetting and Enhances Model Merging", ICLR).

Per tensor: merge the deltas with an inner method (``task_arithmetic`` or ``ties``) to get
``δ_merged`` without adding the base, then scale it by depth and add the base:

* a tensor of residual block ``l`` of ``L`` (0-based): ``α + β·l/(L − 1)``
  (``α + β`` when ``L = 1``), so the first block gets ``α`` and the last ``α + β``;
* a tensor outside the blocks (embeddings, final norm, head; ``layer`` is None): ``α``.

Choosing ``α`` and ``β``:

* Single model (preventing forgetting): set ``alpha: λ`` and ``beta: 1 − λ``, so shallow
  blocks stay near the base and the last block keeps the whole fine-tuning update.
* Multi-task: ``alpha: auto`` (the default) sets, per tensor,
  ``α = ‖Σᵢδᵢ‖₁ / (T·‖δ_merged‖₁)`` from the raw (untrimmed, unweighted) deltas, so the
  shallowest scaling gives the merged delta the L1 norm of the mean task vector; ``β`` is
  swept on held-out data. Auto is computed per tensor, not over the whole model; where
  ``δ_merged`` is zero, ``α = 1`` (the result is the base either way). For one model and
  ``weight: 1`` auto gives ``α = 1``.

Recipe encoding of ``alpha``: a string parameter whose default is ``"auto"``; any number
(``alpha: 0.3``, which arrives as ``"0.3"``) sets it explicitly.

Inner-method conventions: ``weight`` (per model, default 1) and ``normalize`` (default
true) feed the inner merge; ``density`` (per model, default 1) is the TIES trim and is
ignored by ``task_arithmetic``. With the default ``normalize: true`` inner TIES is the
paper's disjoint mean; for inner task arithmetic ``normalize`` is a single factor per
tensor that ``alpha: auto`` cancels. There is no ``lambda``: ``α`` and ``β`` take its role.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param, density_check
from graft.merge._task_vectors import combine, per_model, task_vectors
from graft.merge.ties import magnitude_trim

AUTO = "auto"


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS factor for one tensor.

    Args:
        layer: 0-based block index, or None for tensors outside the blocks.
        num_layers: number of blocks ``L``.
        alpha: factor for the first block and for non-block tensors.
        beta: added linearly with depth; the last block gets ``alpha + beta``.

    Returns:
        ``alpha + beta·layer/(L − 1)`` (``alpha + beta`` when ``L = 1``; ``alpha`` when
        ``layer`` is None).
    """
    if layer is None:
        return alpha
    if num_layers <= 1:
        return alpha + beta
    return alpha + beta * layer / (num_layers - 1)


def parse_alpha(value: str | float) -> float | None:
    """``alpha`` as a number, or None for ``"auto"``.

    Raises:
        ValueError: neither ``"auto"`` nor a number.
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    return float(value)


def _alpha_check(value: str) -> str | None:
    try:
        parse_alpha(value)
    except ValueError:
        return f"alpha must be 'auto' or a number, got {value!r}"
    return None


def auto_alpha(delta_sum: torch.Tensor, merged: torch.Tensor, num_models: int) -> float:
    """Multi-task ``α = ‖Σᵢδᵢ‖₁ / (T·‖δ_merged‖₁)``; 1.0 where ``δ_merged`` is zero.

    Args:
        delta_sum: ``Σᵢδᵢ`` of the raw deltas.
        merged: the inner method's merged delta.
        num_models: ``T``.
    """
    merged_l1 = float(merged.abs().sum())
    if merged_l1 == 0:
        return 1.0
    return float(delta_sum.abs().sum()) / (num_models * merged_l1)


def lines(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    beta: float,
    alpha: str | float = AUTO,
    method: str = "task_arithmetic",
    weight: Sequence[float] | None = None,
    density: Sequence[float] | None = None,
    normalize: bool = True,
    layer: int | None = None,
    num_layers: int = 1,
) -> torch.Tensor:
    """Inner merge of the deltas, scaled linearly with depth, added to the base.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        beta: depth slope; the last block gets ``alpha + beta``.
        alpha: ``"auto"`` or a number (as a number or numeric string).
        method: inner merge, ``"task_arithmetic"`` or ``"ties"``.
        weight: per model, inner-merge weight (default 1.0).
        density: per model, TIES trim density (default 1.0; ties only).
        normalize: inner merge divides by the contributing weights.
        layer: 0-based block index of this tensor, or None outside the blocks.
        num_layers: number of blocks.

    Returns:
        ``θ₀ + lines_scale(layer, L, α, β)·δ_merged``.
    """
    n = len(tensors)
    deltas = task_vectors(tensors, base)
    weights = per_model(weight, n, 1.0)
    alpha_value = parse_alpha(alpha)
    raw_sum = deltas.sum(dim=0) if alpha_value is None else None
    if method == "ties":
        for i, p in enumerate(per_model(density, n, 1.0)):
            deltas[i] = magnitude_trim(deltas[i], p)
    merged = combine(deltas, weights, elect=method == "ties", normalize=normalize)
    if alpha_value is None:
        alpha_value = auto_alpha(raw_sum, merged, n)
    return base + lines_scale(layer, num_layers, alpha_value, beta) * merged


SPEC = MethodSpec(
    name="lines",
    fn=lines,
    summary="inner merge (task arithmetic or TIES) scaled linearly with layer depth",
    params=(
        Param(
            "method",
            str,
            "task_arithmetic",
            doc="inner merge of the deltas",
            choices=("task_arithmetic", "ties"),
        ),
        Param(
            "alpha",
            str,
            AUTO,
            doc="scale of the first block and non-block tensors; 'auto' or a number",
            check=_alpha_check,
        ),
        Param("beta", float, REQUIRED, doc="added with depth; last block gets alpha + beta"),
        Param("weight", float, 1.0, per_model=True, doc="inner-merge weight of this model"),
        Param(
            "density",
            float,
            1.0,
            per_model=True,
            doc="TIES trim density (inner method ties only)",
            check=density_check,
        ),
        Param("normalize", bool, True, doc="inner merge divides by contributing weights"),
    ),
    base="required",
    uses_layer=True,
    paper="Wang et al. 2025, LiNeS (ICLR 2025, arXiv:2410.17146)",
)
