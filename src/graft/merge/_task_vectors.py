"""Steps shared by the task-vector family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, LiNeS).

Every method in the family has the same shape (mergekit calls it "generalized task
arithmetic"): take the deltas ``δᵢ = θᵢ − θ₀``, optionally sparsify each one, weight them,
optionally run the TIES sign election, sum (or average), scale by ``lambda`` and add the
base. This module holds the steps that do not depend on the sparsifier, plus the recipe
parameters the whole family accepts with mergekit's names and meanings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.merge._spec import REQUIRED, Param, density_check

# A weight sum below this is treated as zero when normalising (mergekit's guard).
_ZERO_WEIGHT_SUM = 1e-8
# Norms below this are not rescaled (mergekit's guard for its L1 rescale).
_ZERO_NORM = 1e-7


_NARROW = (torch.bfloat16, torch.float16)


def widen(
    tensors: Sequence[torch.Tensor], base: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bfloat16 / float16 inputs as float32 (exact), for the methods that take their inputs
    as stored (``MethodSpec.native_inputs``) and compute in float32."""

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.dtype in _NARROW else t

    return [up(t) for t in tensors], up(base)


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Stack the deltas ``θᵢ − θ₀`` into one fresh ``(T, *shape)`` tensor.

    The stack is written in place (no per-model temporaries then a copy): on a memory-bound
    CPU every pass over a large tensor costs about as much as reading it from disk.
    """
    out = base.new_empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors):
        torch.sub(t, base, out=out[i])
    return out


def per_model(values: Sequence[float] | None, n: int, default: float) -> list[float]:
    """A per-model parameter as a list of ``n`` floats, ``default`` where it was not given."""
    if values is None:
        return [default] * n
    return [float(v) for v in values]


def weight_column(weight: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped ``(T, 1, ..., 1)`` to broadcast against a ``(T, *shape)`` stack."""
    w = torch.tensor(list(weight), dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def combine(
    deltas: torch.Tensor, weight: Sequence[float], *, elect: bool, normalize: bool
) -> torch.Tensor:
    """Weighted combination of (already sparsified) deltas.

    Args:
        deltas: ``(T, *shape)`` stack; overwritten (scaled by the weights in place).
        weight: one weight per model.
        elect: run the TIES election and keep only agreeing entries (disjoint merge).
        normalize: divide by the weights that contributed: ``Σ wᵢmᵢ`` per entry when
            electing (the paper's disjoint mean; a zero divisor becomes 1), else ``Σ wᵢ``
            (a sum below 1e-8 in magnitude becomes 1, as in mergekit).

    Returns:
        The merged delta, shape ``shape``.
    """
    weights = [float(w) for w in weight]
    weighted = deltas
    if any(w != 1.0 for w in weights):
        weighted.mul_(weight_column(weights, deltas))
    if not elect:
        merged = weighted.sum(dim=0)
        if normalize:
            total = sum(weights)
            if abs(total) >= _ZERO_WEIGHT_SUM:
                merged.div_(total)
        return merged
    # Disjoint merge without materialising the agreement mask: where the elected sign is
    # + the agreeing entries are exactly the positive ones, so their sum is Σ max(wᵢδᵢ, 0);
    # where it is −, Σ min(wᵢδᵢ, 0). Zeros (trimmed or dropped entries) never count.
    # Loops over models keep the temporaries at one tensor, not T of them.
    # γ = +, a zero sum counting as +. Summed in model order: torch's sum(dim=0) adds in
    # that order for up to 4 models but regroups from 5 on (its order then depends on the
    # vector width and thread count); a fixed order keeps results reproducible and equal
    # to the fused kernel's (graft.merge._fused).
    total = weighted[0].clone()
    for wd in weighted[1:]:
        total.add_(wd)
    positive = total >= 0
    del total
    pos_sum = torch.zeros_like(weighted[0])
    neg_sum = torch.zeros_like(weighted[0])
    for wd in weighted:
        pos_sum.add_(wd.clamp(min=0))
        neg_sum.add_(wd.clamp(max=0))
    merged = torch.where(positive, pos_sum, neg_sum)
    del pos_sum, neg_sum
    if normalize:
        # Σ wᵢ over agreeing models: over the positive entries where γ = +, else the negative.
        if len(set(weights)) == 1:  # equal weights: w x the count of agreeing models
            small = torch.int8 if len(weights) < 128 else torch.int32  # int64 sums are slow
            count = torch.where(
                positive,
                (weighted > 0).sum(dim=0, dtype=small),
                (weighted < 0).sum(dim=0, dtype=small),
            )
            divisor = count.to(merged.dtype).mul_(weights[0])
        else:
            divisor = torch.zeros_like(merged)
            for w, wd in zip(weights, weighted, strict=True):
                agree = torch.where(positive, wd > 0, wd < 0)
                divisor.add_(agree.to(divisor.dtype), alpha=w)
        divisor.masked_fill_(divisor == 0, 1.0)
        merged.div_(divisor)
    return merged


def l1_rescale(kept: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """mergekit's rescale: scale ``kept`` so its L1 norm equals that of ``dense``.

    Left unscaled when either norm is below 1e-7. This matches the paper's 1/p rescale
    only in expectation.
    """
    before = dense.abs().sum()
    after = kept.abs().sum()
    if before < _ZERO_NORM or after < _ZERO_NORM:
        return kept
    return kept * (before / after)


def finish(
    base: torch.Tensor, merged: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``θ₀ + λ·merged`` (``merged`` is overwritten), cast to ``out_dtype`` when given."""
    if scale != 1:
        merged.mul_(scale)
    merged.add_(base)
    return merged if out_dtype is None else merged.to(out_dtype)


def unit_interval_check(name: str):
    """Validator for parameters that live in ``[0, 1)``."""

    def check(value: float) -> str | None:
        if not (0.0 <= value < 1.0):
            return f"{name} must be in [0, 1), got {value}"
        return None

    return check


def rescale_mode_param() -> Param:
    """``rescale_mode``: how DARE/DELLA rescale kept entries when ``rescale`` is true."""
    return Param(
        "rescale_mode",
        str,
        "paper",
        doc="paper: divide kept entries by their keep probability; l1: match the dense "
        "delta's L1 norm (mergekit)",
        choices=("paper", "l1"),
    )


def family_params(
    *,
    normalize: bool,
    rescale: bool,
    rescale_doc: str,
    density_doc: str = "fraction of delta entries kept",
) -> tuple[Param, ...]:
    """The parameters every task-vector method accepts, with mergekit's names and defaults.

    Args:
        normalize: this method's mergekit default for ``normalize``.
        rescale: this method's mergekit default for ``rescale``.
        rescale_doc: what ``rescale`` does for this method.
        density_doc: what ``density`` does for this method.
    """
    return (
        Param("weight", float, REQUIRED, per_model=True, doc="weight of this model's delta"),
        Param(
            "density",
            float,
            1.0,
            per_model=True,
            doc=density_doc,
            check=density_check,
        ),
        Param("normalize", bool, normalize, doc="divide by the sum of contributing weights"),
        Param("rescale", bool, rescale, doc=rescale_doc),
        Param("lambda", float, 1.0, arg="scale", doc="scale of the merged delta"),
        Param(
            "int8_mask",
            bool,
            False,
            doc="mergekit memory option; accepted, no effect on the result",
        ),
    )
