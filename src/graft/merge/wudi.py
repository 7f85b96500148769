"""WUDI-Merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML).

The rows of a linear layer's task vector approximately span the inputs that task feeds the
layer, so the interference of a merged delta ``τ`` on task ``i``, ``(τ − δᵢ)x``, can be
measured on those rows without data. Per 2-D tensor (``out × in``), with ``δᵢ = θᵢ − θ₀``,
``T`` models and ``nᵢ = ‖δᵢ‖²_F``, WUDI minimises

    L(τ) = Σᵢ ‖(τ − δᵢ) δᵢᵀ‖²_F / nᵢ,

then returns ``θ₀ + λ·τ``. ``L`` is quadratic: ``∇L = 2(τG − B)`` with
``G = Σᵢ δᵢᵀδᵢ / nᵢ`` (``in × in``) and ``B = Σᵢ δᵢ δᵢᵀ δᵢ / nᵢ`` (``out × in``). Two solvers:

* ``adam`` (the paper's, the default): ``τ`` starts at the task-arithmetic sum ``Σᵢ δᵢ`` and
  takes ``steps`` Adam steps (default 300) at learning rate ``lr`` (default 1e-5, betas
  (0.9, 0.999), eps 1e-8, no weight decay), as the reference code does.
* ``closed_form``: the minimiser ``τ = B G⁺``, which is exact and does not depend on the
  scale of the deltas.

Conventions that change results (reference: ``get_redundant_task_vector`` in
nathanielyvo/WUDI-Merging, and FusionBench's ``wudi_merging``):

* **Adam stops early, by design of its defaults.** Adam's step is at most about ``lr`` per
  entry, so 300 steps at 1e-5 move each entry at most about 3e-3 away from the sum. For
  task vectors with larger entries the result stays near task arithmetic at λ = 1; the
  closed form is the point those steps head for. With more steps and a larger ``lr`` Adam
  reaches it (tests/test_merge_wudi.py checks this).
* **The gradient is computed from G and B**, which are built once per tensor; the reference
  differentiates ``L`` itself. The gradients are equal (up to rounding); one step costs
  one ``(out × in)(in × in)`` product instead of ``2T`` ``(out × in)(in × out)`` ones
  (the loss and its backward pass).
* **Which tensors.** Every 2-D tensor is optimised, embeddings and heads included, as in
  FusionBench; the reference's ViT script merges only the attention and MLP weights, and
  LLM ports of it skip ``lm_head``. ``optimize: false`` (settable per tensor with a filter, e.g.
  ``[{filter: lm_head, value: false}]``) gives a 2-D tensor the rule of 1-D ones.
* **Tensors that are not 2-D** (biases, norms) get the mean of the deltas ``Σ δᵢ / T``,
  as in FusionBench.
* ``lambda`` (default 1; the paper uses no scaling coefficient) scales every tensor's
  merged delta.
* A zero task vector (``nᵢ = 0``, a model that left the tensor alone) is left out of ``L``;
  the reference divides by zero there.
* Where ``G`` is singular (task vectors of low rank, e.g. from LoRA adapters, spanning
  fewer than ``in`` directions together), the closed form is the minimum-norm minimiser
  ``B G⁺`` (eigenvalues of ``G`` below ``in·eps·max`` are treated as zero). Gradient
  descent from the sum converges to the same point, since the sum's rows lie in ``G``'s
  range; Adam scales each entry's step and may leave a component outside it.
* The math runs in float64 for tensors of at most 65,536 entries and for float64 inputs,
  else in float32, on the tensors' device; the result has the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec, Param
from graft.merge._task_vectors import finish
from graft.merge.tsv import mean_delta, svd_dtype


def interference_terms(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, B, Σδᵢ)`` for one 2-D tensor, in ``work`` dtype, one delta alive at a time.

    ``G = Σ δᵢᵀδᵢ / nᵢ`` and ``B = Σ δᵢ δᵢᵀ δᵢ / nᵢ`` over the nonzero deltas, so that
    ``L(τ) = ⟨τG, τ⟩ − 2⟨B, τ⟩ + const`` and ``∇L = 2(τG − B)``.
    """
    base_w = base.to(work)
    out_dim, in_dim = base.shape
    gram = base_w.new_zeros((in_dim, in_dim))
    target = base_w.new_zeros((out_dim, in_dim))
    total = base_w.new_zeros((out_dim, in_dim))
    for t in tensors:
        delta = t.to(work) - base_w
        total.add_(delta)
        norm = float(delta.square().sum())
        if norm == 0.0:
            continue
        g = delta.T @ delta
        gram.add_(g, alpha=1.0 / norm)
        target.addmm_(delta, g, alpha=1.0 / norm)
        del delta, g
    return gram, target, total


def closed_form(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The minimum-norm minimiser ``B G⁺`` of ``L`` (``G`` symmetric positive semidefinite)."""
    w, v = torch.linalg.eigh(gram)
    top = w.max() if w.numel() else w.new_zeros(())
    keep = w > top * gram.shape[0] * torch.finfo(gram.dtype).eps
    v = v[:, keep]
    return ((target @ v) / w[keep]) @ v.T


def adam(
    gram: torch.Tensor, target: torch.Tensor, start: torch.Tensor, *, steps: int, lr: float
) -> torch.Tensor:
    """``steps`` Adam steps on ``L`` from ``start`` (overwritten and returned)."""
    tau = start
    options = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0}
    try:  # torch's fused kernel: the same update, several times faster on CPU
        optimizer = torch.optim.Adam([tau], fused=True, **options)
    except RuntimeError:  # a device without one
        optimizer = torch.optim.Adam([tau], **options)
    grad = torch.empty_like(tau)
    tau.grad = grad
    for _ in range(steps):
        torch.addmm(target, tau, gram, beta=-2.0, alpha=2.0, out=grad)  # 2(τG − B)
        optimizer.step()
    tau.grad = None
    return tau


def wudi(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    solver: str = "adam",
    steps: int = 300,
    lr: float = 1e-5,
    optimize: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """Merge by minimising each task's interference on its own task vector's rows.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        solver: ``adam`` (the paper's) or ``closed_form``.
        steps / lr: Adam's steps and learning rate.
        optimize: false gives this tensor the mean of the deltas, as 1-D tensors get.
        scale: ``λ``, applied to the merged delta of every tensor.

    Returns:
        ``θ₀ + λ·τ`` for 2-D tensors, ``θ₀ + λ·mean(δᵢ)`` otherwise.
    """
    if base.dim() != 2 or not optimize or base.numel() == 0:
        return finish(base, mean_delta(tensors, base, [1.0] * len(tensors)), scale)
    gram, target, total = interference_terms(tensors, base, svd_dtype(base))
    if solver == "closed_form":
        merged = closed_form(gram, target)
    else:
        merged = adam(gram, target, total, steps=steps, lr=lr)
    return finish(base, merged.to(base.dtype), scale)


def _steps_check(value: int) -> str | None:
    return None if value >= 0 else f"steps must be >= 0, got {value}; the paper uses 300"


def _lr_check(value: float) -> str | None:
    return None if value > 0 else f"lr must be > 0, got {value}; the paper uses 1e-5"


SPEC = MethodSpec(
    name="wudi",
    fn=wudi,
    summary="per 2-D tensor, the delta least interfering with each task's own rows",
    params=(
        Param(
            "solver",
            str,
            "adam",
            doc="adam: the paper's 300 steps from the sum; closed_form: the exact minimiser",
            choices=("adam", "closed_form"),
        ),
        Param("steps", int, 300, doc="Adam steps (the paper's 300)", check=_steps_check),
        Param("lr", float, 1e-5, doc="Adam's learning rate (the paper's 1e-5)", check=_lr_check),
        Param(
            "optimize",
            bool,
            True,
            doc="false: this 2-D tensor gets the mean of the deltas (per tensor via filters)",
        ),
        Param("lambda", float, 1.0, arg="scale", doc="scale of the merged delta (paper: none)"),
    ),
    base="required",
    paper="Cheng et al. 2025, Whoever Started the Interference Should End It: WUDI-Merging "
    "(ICML 2025, arXiv:2503.08099)",
)
