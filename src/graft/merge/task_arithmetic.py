"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR).

``θ₀ + λ Σ wᵢδᵢ`` with ``δᵢ = θᵢ − θ₀``, per tensor.

Conventions that change results:

* ``normalize`` (default false, as mergekit) divides ``Σ wᵢδᵢ`` by ``Σ wᵢ`` (left undivided
  when ``|Σ wᵢ| < 1e-8``); with it the merge is a weighted mean of the deltas.
* ``lambda`` multiplies the merged delta after normalisation. Typical values 0.3–1.0,
  chosen on held-out data.
* ``density``, ``rescale`` and ``int8_mask`` are accepted because mergekit accepts them
  for this method, and ignored as mergekit ignores them (no sparsification here).

Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model
Merging and Compression", ICML), off unless ``consensus_k`` is set:

* **TALL mask** of task ``t``: ``mₜ = |δₜ| > λ_tall·|τ − δₜ|``, elementwise, with ``δₜ`` the
  task's raw (unweighted) delta, ``τ`` the merged delta before ``lambda`` (here
  ``Σ wᵢδᵢ``, divided by ``Σ wᵢ`` under ``normalize``) and ``λ_tall = tall_mask_lambda``.
  The inequality is strict, as in the reference code (``generate_task_masks`` in
  nik-dim/tall_masks, copied by FusionBench's ``tall_mask``).
* **Consensus**: keep the entries of ``τ`` where at least ``consensus_k`` TALL masks are on,
  zero the rest (``construct_consensus_mask``), then ``θ₀ + λ·τ``. The paper uses
  ``consensus_k: 2`` (drops "selfish" weights used by one task and "catastrophic" ones used
  by none); ``0`` (the default) keeps everything and returns plain task arithmetic, bit
  for bit; a value above ``T`` returns the base.
* ``tall_mask_lambda`` defaults to 0.6, FusionBench's default and the top of the paper's
  grid ``{0.2, …, 0.6}``; the paper picks it per task on validation data, which graft, being
  data-free here, does not.
* Masks are elementwise, so the per-tensor computation equals the reference's
  flattened-model one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import combine, family_params, finish, task_vectors


def consensus_mask(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    merged: torch.Tensor,
    *,
    consensus_k: int,
    tall_mask_lambda: float,
) -> torch.Tensor:
    """Entries of ``merged`` on which at least ``consensus_k`` tasks' TALL masks agree.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        merged: the merged delta ``τ`` (before ``lambda``).
        consensus_k: minimum number of tasks whose mask must be on.
        tall_mask_lambda: ``λ_tall`` in ``|δₜ| > λ_tall·|τ − δₜ|``.

    Returns:
        Boolean mask, shape of ``merged``.
    """
    small = torch.int16 if len(tensors) < 2**15 else torch.int32
    count = torch.zeros(merged.shape, dtype=small, device=merged.device)
    for t in tensors:  # one raw delta alive at a time
        delta = t - base
        count.add_(delta.abs() > (merged - delta).abs_().mul_(tall_mask_lambda))
    return count >= consensus_k


def consensus_params() -> tuple[Param, ...]:
    """``consensus_k`` and ``tall_mask_lambda``, shared by task arithmetic and TIES."""
    return (
        Param(
            "consensus_k",
            int,
            0,
            doc="consensus merging: keep entries where at least this many TALL masks are on "
            "(paper: 2); 0 = off",
            check=_consensus_k_check,
        ),
        Param(
            "tall_mask_lambda",
            float,
            0.6,
            doc="TALL threshold: task t claims entries where abs(d_t) > this * abs(merged - d_t)",
            check=_tall_lambda_check,
        ),
    )


def _consensus_k_check(value: int) -> str | None:
    if value < 0:
        return f"consensus_k must be >= 0, got {value}; use 2 (the paper's) or 0 for off"
    return None


def _tall_lambda_check(value: float) -> str | None:
    if not value >= 0:
        return f"tall_mask_lambda must be >= 0, got {value}; the paper uses 0.2 to 0.6"
    return None


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    scale: float = 1.0,
    int8_mask: bool = False,
    consensus_k: int = 0,
    tall_mask_lambda: float = 0.6,
) -> torch.Tensor:
    """Add the weighted sum of task vectors to the base.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: ignored (mergekit compatibility).
        normalize: divide the weighted sum by ``Σ wᵢ``.
        rescale: ignored (mergekit compatibility).
        scale: ``λ``, applied to the merged delta.
        int8_mask: ignored (mergekit compatibility).
        consensus_k: consensus merging's minimum TALL-mask count; 0 turns it off.
        tall_mask_lambda: the TALL masks' threshold.

    Returns:
        ``θ₀ + λ Σ wᵢδᵢ`` (or the normalised form), consensus-masked when ``consensus_k``.
    """
    merged = combine(task_vectors(tensors, base), weight, elect=False, normalize=normalize)
    if consensus_k > 0:
        keep = consensus_mask(
            tensors, base, merged, consensus_k=consensus_k, tall_mask_lambda=tall_mask_lambda
        )
        merged.masked_fill_(~keep, 0.0)
    return finish(base, merged, scale)


SPEC = MethodSpec(
    name="task_arithmetic",
    fn=task_arithmetic,
    summary="base + lambda * sum of weighted task vectors",
    params=family_params(
        normalize=False,
        rescale=False,
        rescale_doc="accepted for mergekit recipes; no effect here",
        density_doc="accepted for mergekit recipes; no effect here",
    )
    + consensus_params(),
    base="required",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
)
