"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR).

For each linear layer, the merged weight minimises ``Σᵢ ‖XᵢW − XᵢWᵢ‖²`` over the layer's
inputs ``Xᵢ`` on each model's own data. With torch's ``(out, in)`` layout the solution is

    ``W*ᵀ = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ``,   ``Gᵢ = XᵢᵀXᵢ``  (shape ``(in, in)``)

solved as a linear system on ``Wᵀ`` (``(in, out)``) in float64, never with an explicit
inverse, then transposed back.

Regularisation (paper §3.3, the ``reduce_non_diag`` of its code): ``G̃ = αG + (1 − α)
diag(G)``, i.e. off-diagonal entries scaled by ``alpha``, the diagonal kept. ``alpha: 1``
is the exact least-squares merge; ``alpha: 0`` merges each input column by a per-feature
weighted average. The paper tunes α on validation data (0.1–0.95); graft's default 0.9
stays close to the exact solution while keeping the system well conditioned.

Conventions that change results:

* Statistics: ``graft stats gram`` stores ``Gᵢ`` under the Linear's *weight* name, as the
  **sum** ``XᵢᵀXᵢ`` over all input rows (not the mean), so a model with more rows counts
  more, as in pooled least squares. A model's ``weight`` multiplies its Gram (and its
  tensors in the plain averages); ``weight: 1/rows`` gives each model equal say.
* Tensors without a Gram (biases, LayerNorm, embeddings that are not Linear, any tensor
  for which some model's file has no entry, or whose entry is not ``(in, in)`` for a 2-D
  weight) get the weighted average ``Σ wᵢθᵢ / Σ wᵢ``.
  The paper does the same for non-linear parameters.
* Input features that are zero on every model's data (dead units) leave the system
  singular; their weight columns are set to the weighted average. Any remaining
  singularity falls back to the minimum-norm least-squares solution.
* No base: a ``base_model`` named in the recipe is one more input (like ``linear``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, MethodSpec, Param
from graft.merge._task_vectors import per_model
from graft.merge.linear import linear


def _alpha_check(value: float) -> str | None:
    if not (0.0 <= value <= 1.0):
        return f"alpha must be in [0, 1], got {value}; use e.g. alpha: 0.9"
    return None


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·G + (1 − α)·diag(G)``: off-diagonal entries scaled by ``alpha``."""
    if alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    stats: Sequence[torch.Tensor | None] | None = None,
    weight: Sequence[float] | None = None,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Least-squares merge of linear weights given each model's input Gram matrix.

    Args:
        tensors: the inputs, one per model; a linear weight is ``(out, in)``.
        base: unused; this method takes no base.
        stats: per model, the Gram ``XᵢᵀXᵢ`` (``(in, in)``) of this weight's layer inputs,
            or None. None (or any None entry) gives the weighted average.
        weight: per model, multiplies its Gram (default 1.0).
        alpha: scale of the Grams' off-diagonal entries.

    Returns:
        The merged tensor, in the inputs' dtype.
    """
    weights = per_model(weight, len(tensors), 1.0)
    if (
        stats is None
        or any(g is None for g in stats)
        or tensors[0].dim() != 2
        or any(g.shape != (tensors[0].shape[1],) * 2 for g in stats)  # type: ignore[union-attr]
    ):
        return linear(tensors, None, weight=weights, normalize=True)
    f64 = torch.float64
    lhs = torch.zeros(stats[0].shape, dtype=f64, device=tensors[0].device)  # type: ignore[union-attr]
    rhs = torch.zeros(tensors[0].shape[::-1], dtype=f64, device=tensors[0].device)
    for w_i, gram, scale in zip(tensors, stats, weights, strict=True):
        g = reduce_non_diagonal(gram.to(f64), alpha) * scale  # type: ignore[union-attr]
        lhs += g
        rhs += g @ w_i.to(f64).T
    dead = lhs.diagonal() == 0
    if bool(dead.any()):
        # No model's data reaches these inputs: the equations for their columns are 0 = 0.
        # A unit Gram entry per model there turns them into the weighted average.
        average = linear([t.to(f64) for t in tensors], None, weight=weights, normalize=True)
        idx = dead.nonzero().flatten()
        lhs[idx, idx] = 1.0
        rhs[idx] = average.T[idx]
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution
    return solution.T.to(device=tensors[0].device, dtype=tensors[0].dtype).contiguous()


SPEC = MethodSpec(
    name="regmean",
    fn=regmean,
    summary="least-squares merge of linear layers from their input Gram matrices (data-aware)",
    params=(
        Param(
            "statistics",
            str,
            REQUIRED,
            per_model=True,
            doc="Gram file of this model, from `graft stats gram`",
        ),
        Param("weight", float, 1.0, per_model=True, doc="multiplies this model's Gram"),
        Param(
            "alpha",
            float,
            0.9,
            doc="scale of the Grams' off-diagonal entries (1 = exact least squares)",
            check=_alpha_check,
        ),
    ),
    base="none",
    stats="gram",
    stats_shape=lambda shape: (shape[-1], shape[-1]),  # inputs x inputs of an (out, in) weight
    paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models "
    "(arXiv:2212.09849)",
)
