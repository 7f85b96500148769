"""Iso-C and Iso-CTS, isotropic merging (Marczak et al. 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML).

Per 2-D tensor (``out × in``), with ``δᵢ = wᵢ(θᵢ − θ₀)``, ``T`` models, ``r = min(out, in)``
and the task-arithmetic sum ``Δ = Σᵢ δᵢ = UΣVᵀ``:

**Iso-C** (isotropic merging in the common subspace): flatten the spectrum,
``merged = σ̄·UVᵀ`` with ``σ̄`` the mean of all ``r`` singular values of ``Δ``.

**Iso-CTS** (common and task-specific subspaces):

1. Sizes: ``c₀ = int(r·common_space_fraction)``; ``n = round((r − c₀)/T)`` directions per
   task (Python's ``round``, halves to even); common size ``c = r − T·n``, so that the
   ``T·n + c = r`` directions fill the rank exactly.
2. Common subspace: the top ``c`` components ``U_c, Σ_c, V_c`` of ``Δ``.
3. Task-specific subspaces: for each task, ``δᵢ − U_cU_cᵀδᵢ`` (the left common subspace
   projected out; the right side is not projected) and the top ``n`` components
   ``Uᵢ, Σᵢ, Vᵢ`` of its SVD.
4. Stack ``[U₁ … U_T U_c]`` and ``[V₁ᵀ; …; V_Tᵀ; V_cᵀ]`` (common block last) and replace each
   by its polar factor ``PQᵀ`` (SVD ``PΣQᵀ``, the same orthogonalisation as TSV-M).
5. ``merged = σ̄·U_⊥V_⊥ᵀ``, ``σ̄`` the mean of the ``r`` stacked singular values (the
   task-specific ``Σᵢ`` and the common ``Σ_c``, not the mean of ``Δ``'s spectrum).

Both end with ``θ₀ + λ·merged``.

Conventions that change results (all as the reference code, ``iso_c`` and ``iso_cts`` in
``src/utils/iso.py`` of danielm1405/iso-merging, and FusionBench's ``ISO_C_Merge`` /
``ISO_CTS_Merge``):

* **Tensors that are not 2-D** get the mean of the deltas ``Σ wᵢδᵢ / T``, then ``λ``. Every
  2-D tensor is merged spectrally, embeddings and heads included (the reference skips
  only CLIP's ``text_projection``).
* ``lambda`` (default 1.0, FusionBench's ``scaling_factor``) scales every tensor's merged
  delta. The paper chooses it on held-out data; its code searches ``(0, 3]``.
  ``weight`` (default 1) scales each delta before anything else; the reference has no
  weights.
* ``common_space_fraction`` defaults to 0.8, the reference's; 1.0 gives Iso-C. Where the
  reference's rounding would ask for more task directions than fit (``T·n > r``, possible
  only for fractions near 0) graft caps ``n`` at ``r // T``.
* Per tensor, never over the whole model. At least two models: for one model the
  flattened spectrum is not that model.
* SVDs run in float32, or float64 for tensors of at most 65,536 entries and for float64
  inputs (see :mod:`graft.merge.tsv`); the result has the input's dtype. The projected
  task matrices have many near-zero singular values, on which LAPACK's float32 SVD can
  fail to converge (it does for 4096×4096 random deltas, 8 tasks); graft then redoes that
  SVD in float64.
* Flattening the spectrum gives the null space of a rank-deficient ``Δ`` (deltas from
  low-rank adapters) the weight ``σ̄`` too, along singular vectors the SVD backend
  chooses freely, so such merges depend on the backend, as the reference's do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import finish, per_model
from graft.merge.tsv import mean_delta, polar_factor, svd, svd_dtype


def _weighted_deltas(tensors, base, weights, work):
    """Yield ``wᵢ(θᵢ − θ₀)`` one at a time in ``work`` dtype (recomputed, never stored)."""
    base_w = base.to(work)
    for t, w in zip(tensors, weights, strict=True):
        yield (t.to(work) - base_w).mul_(float(w))


def _task_sum(tensors, base, weights, work) -> torch.Tensor:
    total = torch.zeros(base.shape, dtype=work, device=base.device)
    for delta in _weighted_deltas(tensors, base, weights, work):
        total.add_(delta)
    return total


def subspace_sizes(rank: int, count: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS step 1: ``(c, n)``, the common size and the directions per task."""
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / count), rank // count)
    return rank - count * per_task, per_task


def iso_c(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float] | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Task-arithmetic sum with its singular values replaced by their mean.

    Args:
        tensors: fine-tuned tensors, one per model (at least two).
        base: the base model's tensor.
        weight: per model, scales its delta (default 1).
        scale: ``λ``, applied to the merged delta of every tensor.

    Returns:
        ``θ₀ + λ·σ̄UVᵀ`` for 2-D tensors, ``θ₀ + λ·mean(wᵢδᵢ)`` otherwise.
    """
    weights = per_model(weight, len(tensors), 1.0)
    if base.dim() != 2:
        return finish(base, mean_delta(tensors, base, weights), scale)
    total = _task_sum(tensors, base, weights, svd_dtype(base))
    u, s, vh = svd(total)
    merged = ((u * s.mean()) @ vh).to(base.dtype)
    return finish(base, merged, scale)


def iso_cts_matrix(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    common_space_fraction: float,
) -> torch.Tensor:
    """Iso-CTS steps 1–5 for one 2-D tensor, in the SVD dtype."""
    work = svd_dtype(base)
    count = len(tensors)
    rank = min(base.shape)
    common, per_task = subspace_sizes(rank, count, common_space_fraction)
    u, s, vh = svd(_task_sum(tensors, base, weights, work))
    u_c = u[:, :common]
    u_all = u.new_empty((base.shape[0], rank))
    s_all = s.new_empty(rank)
    vh_all = vh.new_empty((rank, base.shape[1]))
    tail = slice(count * per_task, rank)  # the common block goes last, as in the reference
    u_all[:, tail] = u_c
    s_all[tail] = s[:common]
    vh_all[tail] = vh[:common]
    del u, s, vh
    if per_task > 0:
        for i, delta in enumerate(_weighted_deltas(tensors, base, weights, work)):
            specific = delta.sub_(u_c @ (u_c.T @ delta))
            u_t, s_t, vh_t = svd(specific)
            cols = slice(i * per_task, (i + 1) * per_task)
            u_all[:, cols] = u_t[:, :per_task]
            s_all[cols] = s_t[:per_task]
            vh_all[cols] = vh_t[:per_task]
            del specific, u_t, s_t, vh_t
    return s_all.mean() * (polar_factor(u_all) @ polar_factor(vh_all))


def iso_cts(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float] | None = None,
    common_space_fraction: float = 0.8,
    scale: float = 1.0,
) -> torch.Tensor:
    """Common subspace of the sum plus task-specific subspaces, spectrum flattened.

    Args:
        tensors: fine-tuned tensors, one per model (at least two).
        base: the base model's tensor.
        weight: per model, scales its delta (default 1).
        common_space_fraction: share of the rank given to the common subspace (before
            the rounding that makes the task-specific part divisible by ``T``).
        scale: ``λ``, applied to the merged delta of every tensor.

    Returns:
        ``θ₀ + λ·σ̄U_⊥V_⊥ᵀ`` for 2-D tensors, ``θ₀ + λ·mean(wᵢδᵢ)`` otherwise.
    """
    weights = per_model(weight, len(tensors), 1.0)
    if base.dim() != 2:
        return finish(base, mean_delta(tensors, base, weights), scale)
    merged = iso_cts_matrix(tensors, base, weights, common_space_fraction).to(base.dtype)
    return finish(base, merged, scale)


def _fraction_check(value: float) -> str | None:
    if not (0.0 <= value <= 1.0):
        return f"common_space_fraction must be in [0, 1], got {value}; the paper uses 0.8"
    return None


_WEIGHT = Param("weight", float, 1.0, per_model=True, doc="scales this model's delta")
_LAMBDA = Param(
    "lambda", float, 1.0, arg="scale", doc="scale of the merged delta (the paper's alpha)"
)
_PAPER = (
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging "
    "(ICML 2025, arXiv:2502.04959)"
)

ISO_C_SPEC = MethodSpec(
    name="iso_c",
    fn=iso_c,
    summary="task-arithmetic sum with a flat singular spectrum (per 2-D tensor)",
    params=(_WEIGHT, _LAMBDA),
    base="required",
    min_models=2,
    paper=_PAPER,
)

ISO_CTS_SPEC = MethodSpec(
    name="iso_cts",
    fn=iso_cts,
    summary="common subspace of the sum plus task-specific subspaces, flat spectrum",
    params=(
        _WEIGHT,
        Param(
            "common_space_fraction",
            float,
            0.8,
            doc="share of each 2-D tensor's rank kept from the sum; 1 gives iso_c",
            check=_fraction_check,
        ),
        _LAMBDA,
    ),
    base="required",
    min_models=2,
    paper=_PAPER,
)
