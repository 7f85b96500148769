"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR).

``θ₀ + λ Σ wᵢδᵢ`` with ``δᵢ = θᵢ − θ₀``, per tensor.

Conventions that change results:

* ``normalize`` (default false, as mergekit) divides ``Σ wᵢδᵢ`` by ``Σ wᵢ`` (left undivided
  when ``|Σ wᵢ| < 1e-8``); with it the merge is a weighted mean of the deltas.
* ``lambda`` multiplies the merged delta after normalisation. Typical values 0.3–1.0,
  chosen on held-out data.
* ``density``, ``rescale`` and ``int8_mask`` are accepted because mergekit accepts them
  for this method, and ignored as mergekit ignores them (no sparsification here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import MethodSpec
from graft.merge._task_vectors import combine, family_params, finish, task_vectors


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

    Returns:
        ``θ₀ + λ Σ wᵢδᵢ`` (or the normalised form).
    """
    merged = combine(task_vectors(tensors, base), weight, elect=False, normalize=normalize)
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
    ),
    base="required",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
)
