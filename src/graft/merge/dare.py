"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch", ICML).

Per tensor and per model, each entry of ``δᵢ = θᵢ − θ₀`` is kept with probability
``p = density`` (an independent Bernoulli mask) and kept entries are rescaled so the
sparse delta equals the dense one in expectation. Then:

* ``dare_linear``: task arithmetic on the sparse deltas, ``θ₀ + λ Σ wᵢ δ̃ᵢ``;
* ``dare_ties``: TIES sign election and disjoint merge on the sparse deltas (no trim).

Conventions that change results:

* ``rescale`` (default true, as mergekit). ``rescale_mode: paper`` (default) divides kept
  entries by exactly ``p``, the paper's rule. ``rescale_mode: l1`` is mergekit's: it
  scales the kept entries so their L1 norm equals the dense delta's, which is a
  different random factor per tensor, equal to ``1/p`` only in expectation.
* Masks are ``u < p`` with ``u`` uniform in [0, 1), drawn from the ``generator`` the
  engine seeds per tensor, one draw of ``numel`` values per model in model order (on the
  generator's device, so a CPU generator gives the same masks on any device). A model at
  ``density: 1`` draws nothing and its delta passes through unchanged. Because masks are
  drawn in model order, reordering the models changes the sample (not its distribution).
* ``normalize`` defaults to false for both, as in mergekit: ``dare_ties`` is the disjoint
  *sum* by default; set ``normalize: true`` for the disjoint mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from graft.merge import _fused
from graft.merge._spec import MethodSpec
from graft.merge._task_vectors import (
    combine,
    family_params,
    finish,
    l1_rescale,
    per_model,
    rescale_mode_param,
    task_vectors,
    widen,
)

_DRAW_SLICE = 1 << 20
_RESCALE_DOC = "rescale kept entries (see rescale_mode) so the delta is unbiased"


def dare_mask(
    shape: torch.Size,
    density: float | torch.Tensor,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Bernoulli keep-mask: each entry is true with probability ``density``, or with its own
    probability where ``density`` is a float32 tensor of ``shape`` on the generator's device
    (DELLA's MagPrune).

    The mask is ``torch.rand(shape, generator=generator) < density``. With a CPU generator
    it is drawn in C from the generator's own state (`graft.merge._fused.keep_mask`:
    the same mask, the generator advanced as torch.rand advances it, ~10x faster)."""
    probs = density.reshape(-1) if isinstance(density, torch.Tensor) else None
    if generator is not None and generator.device.type == "cpu":
        p = 0.0 if probs is not None else density
        fast = _fused.keep_mask(math.prod(shape), generator, p, probs)
        if fast is not None:
            return fast.view(shape).to(device)
    draw_device = generator.device if generator is not None else device
    keep = torch.empty(shape, dtype=torch.bool, device=draw_device)
    flat = keep.view(-1)
    # Drawn in slices: torch fills uniforms serially, so the slices' draws are exactly one
    # draw of numel values (tested), without a float32 tensor of the whole shape.
    for start in range(0, flat.numel(), _DRAW_SLICE):
        u = torch.rand(
            min(_DRAW_SLICE, flat.numel() - start), generator=generator, device=draw_device
        )
        below = density if probs is None else probs[start : start + u.numel()]
        torch.lt(u, below, out=flat[start : start + u.numel()])
    return keep.to(device)


def dare_drop(
    delta: torch.Tensor,
    keep: torch.Tensor,
    density: float,
    *,
    rescale: bool = True,
    rescale_mode: str = "paper",
) -> torch.Tensor:
    """Apply a given keep-mask to a delta and rescale the survivors.

    Args:
        delta: one model's delta.
        keep: boolean mask, same shape, true where the entry survives.
        density: the keep probability ``p`` the mask was drawn with.
        rescale: rescale the kept entries.
        rescale_mode: ``"paper"`` divides by ``p``; ``"l1"`` matches the L1 norm of
            ``delta`` (mergekit).

    Returns:
        The sparse delta.
    """
    kept = torch.where(keep, delta, 0)
    if not rescale:
        return kept
    if rescale_mode == "l1":
        return l1_rescale(kept, delta)
    return kept / density


def dare_sparsify(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    *,
    rescale: bool = True,
    rescale_mode: str = "paper",
) -> torch.Tensor:
    """Random drop and rescale of one delta; ``density >= 1`` returns it unchanged."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = dare_mask(delta.shape, density, generator, delta.device)
    return dare_drop(delta, keep, density, rescale=rescale, rescale_mode=rescale_mode)


def _dare(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    elect: bool,
    weight: Sequence[float],
    density: Sequence[float] | None,
    normalize: bool,
    rescale: bool,
    rescale_mode: str,
    scale: float,
    generator: torch.Generator | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    densities = per_model(density, len(tensors), 1.0)
    if _fused.random_mask_usable(
        tensors, base, generator, elect=elect, rescale=rescale, rescale_mode=rescale_mode
    ):
        # The masks are drawn exactly as dare_sparsify draws them (same order, same draws).
        start_state = generator.get_state()
        sparse = [_fused_sparsifier(p, base, generator) for p in densities]
        out = _fused.merge(
            tensors, base, sparse, weight=weight, normalize=normalize, scale=scale,
            rescale=rescale, out_dtype=out_dtype,
        )  # fmt: skip
        if out is not None:
            return out
        generator.set_state(start_state)  # the torch path draws the same masks again
    tensors, base = widen(tensors, base)
    deltas = task_vectors(tensors, base)
    for i, p in enumerate(densities):
        deltas[i] = dare_sparsify(
            deltas[i], p, generator, rescale=rescale, rescale_mode=rescale_mode
        )
    merged = combine(deltas, weight, elect=elect, normalize=normalize)
    return finish(base, merged, scale, out_dtype)


def _fused_sparsifier(
    density: float, base: torch.Tensor, generator: torch.Generator | None
) -> _fused.Sparsifier:
    if density >= 1:
        return _fused.Sparsifier(_fused.DENSE)
    if density <= 0:
        return _fused.Sparsifier(_fused.ZERO)
    keep = dare_mask(base.shape, density, generator, base.device)
    return _fused.Sparsifier(_fused.MASK, mask=keep, p=density)


def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: str = "paper",
    scale: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Task arithmetic on DARE-sparsified deltas.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, keep probability ``p`` (default 1.0: no drop).
        normalize: divide the weighted sum by ``Σ wᵢ``.
        rescale: rescale kept entries.
        rescale_mode: ``"paper"`` (1/p) or ``"l1"`` (mergekit's norm matching).
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.
        generator: source of the random masks.

    Returns:
        The merged tensor.
    """
    return _dare(
        tensors,
        base,
        elect=False,
        weight=weight,
        density=density,
        normalize=normalize,
        rescale=rescale,
        rescale_mode=rescale_mode,
        scale=scale,
        generator=generator,
    )


def dare_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: str = "paper",
    scale: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES election and disjoint merge on DARE-sparsified deltas.

    Args:
        tensors: fine-tuned tensors, one per model.
        base: the base model's tensor.
        weight: one weight per model.
        density: per model, keep probability ``p`` (default 1.0: no drop).
        normalize: disjoint mean (true) or disjoint sum (false, mergekit's default).
        rescale: rescale kept entries.
        rescale_mode: ``"paper"`` (1/p) or ``"l1"`` (mergekit's norm matching).
        scale: ``λ``, applied to the merged delta.
        int8_mask: accepted for mergekit recipes; no effect.
        generator: source of the random masks.
        out_dtype: the result's dtype (default float32), rounded as a cast rounds.

    Returns:
        The merged tensor.
    """
    return _dare(
        tensors,
        base,
        elect=True,
        weight=weight,
        density=density,
        normalize=normalize,
        rescale=rescale,
        rescale_mode=rescale_mode,
        scale=scale,
        generator=generator,
        out_dtype=out_dtype,
    )


_PAPER = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"

DARE_LINEAR_SPEC = MethodSpec(
    name="dare_linear",
    fn=dare_linear,
    summary="randomly drop delta entries, rescale, add weighted sum to base",
    params=(
        *family_params(normalize=False, rescale=True, rescale_doc=_RESCALE_DOC),
        rescale_mode_param(),
    ),
    base="required",
    uses_seed=True,
    order_independent=False,
    paper=_PAPER,
)

DARE_TIES_SPEC = MethodSpec(
    name="dare_ties",
    fn=dare_ties,
    summary="randomly drop delta entries, rescale, TIES sign election and merge",
    params=(
        *family_params(normalize=False, rescale=True, rescale_doc=_RESCALE_DOC),
        rescale_mode_param(),
    ),
    base="required",
    native_inputs=True,
    native_output=True,
    uses_seed=True,
    order_independent=False,
    paper=_PAPER,
)
