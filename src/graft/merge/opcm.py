"""OPCM, continual merging by orthogonal projection (Tang et al. 2025, "Merging Models on
the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
arXiv:2501.09522).

Models arrive one at a time, in the order given; ``τₜ = θₜ − θ₀`` per tensor. The state
after ``t`` models is, per tensor, the running sum ``Sₜ`` of the (projected) task vectors
and ``Nₜ = Σᵢ₌₁..ₜ ‖τᵢ‖`` (Frobenius norms):

1. **First model**: ``S₁ = τ₁``.
2. **Project** (each later model, per 2-D tensor): thin SVD of the merged delta so far,
   ``Sₜ₋₁ = U Σ Vᵀ``; ``k`` = the number of leading singular values whose cumulative share
   of ``Σσᵢ`` is at most ``α`` (the reference's ``argmax(cumsum(σ)/Σσ > α)``). In the
   basis ``C = Uᵀ τₜ V``, zero the ``k × k`` block ``C[:k, :k]`` (the dominant subspace's
   own coordinates) and the whole diagonal ``Cᵢᵢ`` (the direction ``uᵢvᵢᵀ`` of every
   singular component), then map back: ``τ̃ₜ = τₜ − U (C − C̃) Vᵀ``.
3. **Add**: ``Sₜ = Sₜ₋₁ + τ̃ₜ``; tensors that are not 2-D (biases, norms) and 2-D tensors
   with ``project: false`` are added unprojected, ``Sₜ = Sₜ₋₁ + τₜ``.
4. **Adaptive λ**: the merged model is ``θ₀ + Sₜ / λₜ`` with ``λₜ = ‖Sₜ‖ / (Nₜ / t)``, so
   the merged delta's norm equals the mean task-vector norm (``λ₁ = 1``).

Conventions that change results (reference: ``OPCMForCLIP`` in FusionBench's
``fusion_bench/method/opcm/opcm.py``):

* **λ is per tensor.** The reference takes both norms over the whole flattened model (one
  λ for all tensors); graft, like every method it streams, takes them per tensor, so each
  tensor's merged delta has its own task vectors' mean norm. The projection does not depend
  on λ (the subspace of ``Sₜ/λₜ`` is that of ``Sₜ``), so only the final scale differs.
* **Non-2-D tensors are summed, then rescaled** by the same λ rule, as in the reference
  (its ``merge_other_parameters``), not averaged: parallel deltas come back at their mean,
  mutually orthogonal ones at ``Σ τᵢ / √t`` of equal norms.
* **Which 2-D tensors are projected.** The reference projects the weights of ``nn.Linear``
  modules only and sums everything else (embeddings included). A tensor function sees no
  module types, so graft projects every 2-D tensor unless ``project`` is false for it; a
  recipe gets the reference's rule for BERT/CLIP-style names with
  ``project: [{filter: embeddings, value: false}]``.
* **Only the subspace the merged delta spans.** The reference uses full SVD bases, whose
  columns past ``rank(Sₜ₋₁)`` are arbitrary (whatever the backend returns), and zeroes the
  diagonal there too. graft uses the components with a nonzero singular value only
  (``σᵢ > σ₁·max(out, in)·eps``, ``torch.linalg.matrix_rank``'s tolerance): a new task
  vector orthogonal to the merged delta's row and column spaces is added whole. For a
  merged delta of full rank (any real fine-tune) the two are the same matrix. A merged
  delta of zero (the first model left the tensor alone) projects nothing out.
* ``α`` in ``[0, 1)``, default 0.5 (FusionBench's config). ``k`` counts singular values,
  not their squares; whatever ``α``, the diagonal goes.
* **Order matters**: the first model is added whole and each later one loses what the
  earlier ones already span, so permuting the models changes the result.
* SVDs as in :mod:`graft.merge.tsv` (float64 for tensors of at most 65,536 entries,
  float32 otherwise; float64 retry on non-convergence); the state ``Sₜ`` is kept in that
  dtype, so a merge resumed from a saved state gives the same bytes as one run in one go.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param
from graft.merge.tsv import svd, svd_dtype


def protected_rank(s: torch.Tensor, alpha: float) -> int:
    """``k``: how many leading singular values have a cumulative share of ``Σσ`` at most
    ``alpha`` (0 when the first alone exceeds it)."""
    share = s.cumsum(0) / s.sum()
    return int((share <= alpha).sum())


def project_out(merged: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 2: ``delta`` without its components in ``merged``'s dominant ``k × k`` block
    and along each of ``merged``'s singular directions ``uᵢvᵢᵀ``.

    Args:
        merged: the merged delta so far, ``Sₜ₋₁`` (2-D).
        delta: the new task vector ``τₜ``, same shape and dtype.
        alpha: share of ``Σσ`` the protected block may cover, in ``[0, 1)``.

    Returns:
        ``τ̃ₜ``, a new tensor.
    """
    u, s, vh = svd(merged)
    tol = s.max() * max(merged.shape) * torch.finfo(s.dtype).eps
    rank = int((s > tol).sum())
    if rank == 0:
        return delta.clone()
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    coords = u.T @ delta @ vh.T  # C = Uᵀ τ V, rank × rank
    k = min(protected_rank(s, alpha), rank)
    removed = torch.diag_embed(coords.diagonal())
    removed[:k, :k] = coords[:k, :k]
    return delta - u @ removed @ vh


def add_task(
    merged: torch.Tensor | None, delta: torch.Tensor, *, alpha: float, project: bool
) -> torch.Tensor:
    """Steps 1–3: the running sum after one more model (``delta`` is consumed).

    Args:
        merged: ``Sₜ₋₁``, or None before the first model.
        delta: ``τₜ``.
        alpha: see `project_out`.
        project: project 2-D tensors (non-2-D ones are always added as they are).
    """
    if merged is None:
        return delta
    if project and delta.dim() == 2:
        delta = project_out(merged, delta, alpha)
    return merged + delta


def rescale(merged: torch.Tensor, norm_sum: float, count: int) -> torch.Tensor:
    """Step 4: ``Sₜ / λₜ``, scaled to the mean task-vector norm ``norm_sum / count``; a
    zero sum stays zero."""
    norm = float(torch.linalg.vector_norm(merged))
    if norm == 0.0:
        return torch.zeros_like(merged)
    return merged * ((norm_sum / count) / norm)


def task_vector(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``θₜ − θ₀`` in the state's dtype (`graft.merge.tsv.svd_dtype` of the base)."""
    work = svd_dtype(base)
    return model.to(work) - base.to(work)


def merged_tensor(base: torch.Tensor, merged: torch.Tensor, norm_sum: float, count: int):
    """``θ₀ + Sₜ/λₜ`` in ``base``'s dtype: what the engine writes for this tensor."""
    return rescale(merged, norm_sum, count).to(base.dtype).add_(base)


def opcm(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    alpha: float = 0.5,
    project: bool = True,
) -> torch.Tensor:
    """Merge models one after another, in the order given, by orthogonal projection.

    Args:
        tensors: fine-tuned tensors, in arrival order.
        base: the base model's tensor.
        alpha: share of the merged delta's ``Σσ`` whose leading components are protected.
        project: project this tensor (when 2-D) or just add it.

    Returns:
        ``θ₀ + S_T/λ_T`` (see the module docstring).
    """
    merged, norm_sum = None, 0.0
    for t in tensors:
        delta = task_vector(t, base)
        norm_sum += float(torch.linalg.vector_norm(delta))
        merged = add_task(merged, delta, alpha=alpha, project=project)
    return merged_tensor(base, merged, norm_sum, len(tensors))


def alpha_check(value: float) -> str | None:
    if not (0.0 <= value < 1.0):
        return f"alpha must be in [0, 1), got {value}; the reference uses 0.5"
    return None


SPEC = MethodSpec(
    name="opcm",
    fn=opcm,
    summary="continual: project each new delta off the merged one's subspace, adaptive λ",
    params=(
        Param(
            "alpha",
            float,
            0.5,
            doc="share of the merged delta's singular-value sum whose components are protected",
            check=alpha_check,
        ),
        Param("project", bool, True, doc="project this 2-D tensor (false: add it unprojected)"),
    ),
    base="required",
    order_independent=False,
    paper="Tang et al. 2025, Merging Models on the Fly Without Retraining (arXiv:2501.09522)",
)
