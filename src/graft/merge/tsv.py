"""TSV-M, Task Singular Vectors Merge (Gargiulo et al. 2025, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR).

Per 2-D tensor (``out × in``), with ``δᵢ = wᵢ(θᵢ − θ₀)``, ``T`` models and
``r = min(out, in)``:

1. **Compress**: SVD each task matrix, ``δᵢ = UᵢSᵢVᵢᵀ``, and keep its top
   ``k = int(sv_reduction·r)`` singular components (``k = r // T`` when ``sv_reduction`` is
   unset, the paper's ``1/T``).
2. **Concatenate**: ``U = [U₁ | … | U_T]`` (``out × Tk``), ``S = diag(S₁, …, S_T)``,
   ``Vᵀ = [V₁ᵀ; …; V_Tᵀ]`` (``Tk × in``), each restricted to its ``k`` components.
3. **Decorrelate**: replace ``U`` by its polar factor, the matrix with orthonormal columns
   nearest to it in Frobenius norm: SVD ``U = PΣQᵀ``, ``U_⊥ = PQᵀ``; likewise ``V_⊥ᵀ`` from
   the SVD of the stacked ``Vᵀ`` (the orthogonal-Procrustes solution). The reference does
   this with two SVDs; its eigendecomposition variant ``U(UᵀU)^-1/2`` is the same matrix
   for a stack of full rank. Gram–Schmidt or QR would give another, order-dependent basis.
4. **Reassemble**: ``merged = U_⊥ S V_⊥ᵀ = Σᵢ U_⊥,ᵢ Sᵢ V_⊥,ᵢᵀ``, then ``θ₀ + λ·merged``.

Conventions that change results (all as the reference code,
``compute_and_sum_svd_mem_reduction`` in ``src/utils/TSVM_utils.py`` of
AntoAndGar/task_singular_vectors, and FusionBench's ``TaskSingularVectorMerging``):

* **Tensors that are not 2-D** (biases, norms) get the mean of the deltas,
  ``Σ wᵢδᵢ / T`` (the paper says these "default to task arithmetic"; its code takes the
  mean, not the sum), then ``λ``. Every 2-D tensor is decomposed, embeddings and heads
  included; the reference skips only CLIP's ``text_projection``.
* ``lambda`` (default 1.0, the paper's and FusionBench's ``alpha``) scales every tensor's
  merged delta, 2-D or not. The reference code searches it on validation data over
  ``(0, 3]``. ``weight`` (default 1) scales each task matrix *before* its SVD, as
  FusionBench's per-model ``alpha`` list does; the reference has no weights.
* Per tensor, never over the whole model. ``k = 0`` (``r < T``) keeps nothing: the tensor
  stays at the base, as in the reference.
* The reference writes the ``Tk`` kept columns into an ``out × r`` zero matrix; when
  ``Tk < r`` the zero columns have zero singular value and, for a stack of full column
  rank, do not change the result, so graft concatenates exactly ``Tk`` columns.
  ``sv_reduction`` above ``1/T`` (``Tk > r``, where the reference fails) is allowed;
  ``sv_reduction: 1`` is the paper's lossless variant.
* SVDs (``torch.linalg.svd``, thin) run in float32, or float64 for tensors of at most
  65,536 entries (256×256) and for float64 inputs; a float32 SVD that fails to converge is
  redone in float64. The result has the input's dtype. They run on the tensors' device.
* Rank-deficient task matrices (a delta from a LoRA adapter of rank below ``k``) put
  singular vectors of zero singular value into the stack; their directions are arbitrary
  (whatever the SVD backend returns) and they do change the polar factor, so such merges
  depend on the backend, as the reference's do.
* Permuting the models permutes the stacks' columns, which the polar factor follows: the
  result does not depend on model order (up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import finish, per_model

# Tensors up to this many entries are decomposed in float64: the SVD cost is negligible
# there, and float32's rounding would show in tiny layers and in tests.
_FLOAT64_MAX_NUMEL = 1 << 16


def svd_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for small or float64 tensors, else float32."""
    if x.dtype == torch.float64 or x.numel() <= _FLOAT64_MAX_NUMEL:
        return torch.float64
    return torch.float32


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, redone in float64 when the float32 one fails to converge.

    LAPACK's float32 divide-and-conquer SVD can fail on matrices with many repeated
    near-zero singular values, such as Iso-CTS's task matrices with the common subspace
    projected out; the float64 retry is cast back to ``a``'s dtype.
    """
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """``PQᵀ`` from the thin SVD ``a = PΣQᵀ``: the nearest matrix with orthonormal columns
    (rows, when ``a`` is wide) to ``a`` in Frobenius norm."""
    p, _, qh = svd(a)
    return p @ qh


def mean_delta(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float]
) -> torch.Tensor:
    """``Σ wᵢ(θᵢ − θ₀) / T``: the reference codes' rule for tensors that are not 2-D."""
    out = torch.zeros_like(base)
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t - base, alpha=float(w))
    return out.div_(len(tensors))


def tsv_matrix(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    sv_reduction: float | None,
) -> torch.Tensor:
    """Steps 1–4 for one 2-D tensor: the merged delta ``U_⊥ S V_⊥ᵀ``, in the SVD dtype."""
    work = svd_dtype(base)
    base_w = base.to(work)
    count = len(tensors)
    rank = min(base.shape)
    k = rank // count if sv_reduction is None else int(sv_reduction * rank)
    if k <= 0:
        return torch.zeros_like(base_w)
    u_all = base_w.new_empty((base.shape[0], count * k))
    s_all = base_w.new_empty(count * k)
    vh_all = base_w.new_empty((count * k, base.shape[1]))
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        delta = (t.to(work) - base_w).mul_(float(w))
        u, s, vh = svd(delta)
        cols = slice(i * k, (i + 1) * k)
        u_all[:, cols] = u[:, :k]
        s_all[cols] = s[:k]
        vh_all[cols] = vh[:k]
        del delta, u, s, vh  # keep one task's full SVD alive at a time
    return (polar_factor(u_all) * s_all) @ polar_factor(vh_all)


def tsv_m(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float] | None = None,
    sv_reduction: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Merge by per-task truncated SVDs whose singular vectors are decorrelated.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: per model, scales its delta before the SVD (default 1).
        sv_reduction: fraction of each task's ``min(out, in)`` singular components kept;
            None keeps ``r // T`` (the paper's ``1/T``).
        scale: ``λ``, applied to the merged delta of every tensor.

    Returns:
        ``θ₀ + λ·U_⊥SV_⊥ᵀ`` for 2-D tensors, ``θ₀ + λ·mean(wᵢδᵢ)`` otherwise.
    """
    weights = per_model(weight, len(tensors), 1.0)
    if base.dim() != 2:
        return finish(base, mean_delta(tensors, base, weights), scale)
    merged = tsv_matrix(tensors, base, weights, sv_reduction).to(base.dtype)
    return finish(base, merged, scale)


def sv_reduction_check(value: float) -> str | None:
    if not (0.0 < value <= 1.0):
        return f"sv_reduction must be in (0, 1], got {value}; leave it unset for 1/T"
    return None


SPEC = MethodSpec(
    name="tsv_m",
    fn=tsv_m,
    summary="per-task truncated SVDs, singular vectors decorrelated (per 2-D tensor)",
    params=(
        Param("weight", float, 1.0, per_model=True, doc="scales this model's delta before its SVD"),
        Param(
            "sv_reduction",
            float,
            None,
            doc="fraction of each task's singular components kept; unset: 1/T (the paper's)",
            check=sv_reduction_check,
        ),
        Param(
            "lambda", float, 1.0, arg="scale", doc="scale of the merged delta (the paper's alpha)"
        ),
    ),
    base="required",
    paper="Gargiulo et al. 2025, Task Singular Vectors (CVPR 2025, arXiv:2412.00081)",
)
