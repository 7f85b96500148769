"""LiNeS: Layer-increasing Network Scaling (Wang et al. 2025, "LiNeS: Post-training Layer
Scaling Prevents Forgetting and Enhances Model Merging", ICLR).

Per tensor: merge the deltas with an inner method (``task_arithmetic`` or ``ties``) into
the multi-task vector ``τ`` without adding the base, then scale it by depth and add the
base, ``θ = θ₀ + λ(l)·τ``:

* a tensor of residual block ``l`` of ``L`` (0-based): ``λ(l) = α + β·l/(L − 1)``
  (``α + β`` when ``L = 1``), so the first block gets ``α`` and the last ``α + β``;
* a tensor outside the blocks (embeddings, final norm, head; ``layer`` is None): ``α``.

The multi-task vector ``τ`` is the one the authors' code scales (``create_task_vector``
in ``src/eval/aggregation.py`` of github.com/wang-kee/LiNeS, then ``LiNeS_scaling`` in
``src/eval/eval.py``):

* ``task_arithmetic``: the **sum** ``τ = Σᵢ wᵢδᵢ`` (their ``sum`` method; weights are
  graft's, default 1). ``normalize`` does not apply: the sum is never divided.
* ``ties``: the TIES vector as is: trim each delta to ``density``, elect signs, then the
  disjoint mean (``normalize: true``, the default; their ``agg: mean``) or the disjoint sum
  (``normalize: false``; their ``dis-sum``).

Choosing ``α`` and ``β``:

* Single model (preventing forgetting): set ``alpha: λ`` and ``beta: 1 − λ``, so shallow
  blocks stay near the base and the last block keeps the whole fine-tuning update.
* Multi-task: ``alpha: auto`` (the default) sets ``α = ‖Σᵢδᵢ‖₁ / (T·‖τ‖₁)`` from the raw
  (untrimmed, unweighted) deltas, as their ``norm_summed_tvs / norm_mtv / num_tasks``, so
  the first block gets the L1 norm of the mean task vector. For task arithmetic with
  equal weights ``w`` that is ``α = 1/(T·w)``: the first block is the plain average of the
  models and the last block gets ``(1/T + w·β)·Σᵢδᵢ``. ``β`` scales the summed task vector
  and is swept on held-out data (their grid: 0.1, 0.2, ..., 1.0 for task arithmetic; 0.1,
  ..., 1.5 for TIES). Where ``τ`` is zero, ``α = 1`` (the result is the base either way);
  for one model and ``weight: 1`` auto gives ``α = 1``.
* Auto is computed per tensor; the authors compute the two norms once over the whole
  flattened model. For task arithmetic with equal weights the two agree (``τ`` is the
  same multiple of ``Σᵢδᵢ`` in every tensor); for TIES, or unequal weights, they differ
  (as does the TIES trim, per tensor in graft and over the flattened model there).

Earlier graft versions scaled, for inner task arithmetic with the default ``normalize:
true``, the weighted *mean* ``Σᵢwᵢδᵢ / Σᵢwᵢ``: a given ``β`` (or numeric ``α``) had
``1/Σᵢwᵢ`` of its effect now (``1/T`` with default weights), and ``β ∈ [0, 1]`` covered
only the paper's ``[0, 1/T]``. To keep an old recipe's model, divide its ``beta`` (and a
numeric ``alpha``) by ``Σᵢwᵢ``; ``alpha: auto`` needs no change. Recipes with ``normalize:
false`` or inner ``ties`` give the same model as before.

Recipe encoding of ``alpha``: a string parameter whose default is ``"auto"``; any number
(``alpha: 0.3``, which arrives as ``"0.3"``) sets it explicitly. ``density`` (per model,
default 1) is the TIES trim and is ignored by ``task_arithmetic``. There is no
``lambda``: ``α`` and ``β`` take its role.
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
    """Multi-task ``α = ‖Σᵢδᵢ‖₁ / (T·‖τ‖₁)``; 1.0 where ``τ`` is zero.

    Args:
        delta_sum: ``Σᵢδᵢ`` of the raw deltas.
        merged: the multi-task vector ``τ`` the scaling is applied to.
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
    """Multi-task vector of the deltas, scaled linearly with depth, added to the base.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        beta: depth slope; the last block gets ``alpha + beta``.
        alpha: ``"auto"`` or a number (as a number or numeric string).
        method: inner merge, ``"task_arithmetic"`` (the weighted sum) or ``"ties"``.
        weight: per model, inner-merge weight (default 1.0).
        density: per model, TIES trim density (default 1.0; ties only).
        normalize: inner TIES takes the disjoint mean (else the disjoint sum); ignored
            by task arithmetic, whose multi-task vector is always the sum.
        layer: 0-based block index of this tensor, or None outside the blocks.
        num_layers: number of blocks.

    Returns:
        ``θ₀ + lines_scale(layer, L, α, β)·τ``.
    """
    n = len(tensors)
    deltas = task_vectors(tensors, base)
    weights = per_model(weight, n, 1.0)
    alpha_value = parse_alpha(alpha)
    raw_sum = deltas.sum(dim=0) if alpha_value is None else None
    ties_inner = method == "ties"
    if ties_inner:
        for i, p in enumerate(per_model(density, n, 1.0)):
            deltas[i] = magnitude_trim(deltas[i], p)
    # The paper scales the summed task vector; only TIES has a mean form (disjoint mean).
    merged = combine(deltas, weights, elect=ties_inner, normalize=normalize and ties_inner)
    if alpha_value is None:
        alpha_value = auto_alpha(raw_sum, merged, n)
    return base + lines_scale(layer, num_layers, alpha_value, beta) * merged


SPEC = MethodSpec(
    name="lines",
    fn=lines,
    summary="multi-task vector (task-arithmetic sum or TIES) scaled linearly with layer depth",
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
        Param(
            "normalize",
            bool,
            True,
            doc="inner TIES: disjoint mean (true) or sum (false); task arithmetic always sums",
        ),
    ),
    base="required",
    uses_layer=True,
    paper="Wang et al. 2025, LiNeS (ICLR 2025, arXiv:2410.17146)",
)
