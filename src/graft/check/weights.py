"""Checks of weight tensors for `graft lint`: pure functions over tensors.

- NaN / Inf values (floating-point tensors).
- All-zero tensors, and duplicated tensors (same dtype, shape and bytes; tensors
  holding one repeated value, e.g. LayerNorm weights of ones, are not counted as
  duplicates).
- Degenerate convolution filters (CNN Filter DB, Gavrikov & Keuper 2022): each 2-D
  kernel slice ``w[o, i]`` of a conv weight (O, I, kh, kw) with kh·kw > 1 is
  *near-zero* when all its values are within 1% of the layer's largest |value| (the
  paper's sparsity criterion) and *near-constant* when it is not near-zero but its
  standard deviation is below 1% of that maximum. Reported as fractions per layer.
- dtype anomalies: float64 weights, floating dtypes that differ from the checkpoint's
  main one, a config ``torch_dtype`` that no weight has.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch

DEGENERATE_TOLERANCE = 0.01  # of the layer's max |value|
DEGENERATE_WARN_FRACTION = 0.1  # a layer with more degenerate filters gets a warning


def value_stats(t: torch.Tensor) -> dict:
    """``nan``, ``inf`` counts and whether the tensor is all zero / one repeated value."""
    if t.numel() == 0:
        return {"nan": 0, "inf": 0, "all_zero": False, "constant": False}
    if t.is_floating_point() or t.is_complex():
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    else:
        nan = inf = 0
    flat = t.reshape(-1)
    zero = bool((flat == 0).all())
    constant = bool((flat == flat[0]).all())
    return {"nan": nan, "inf": inf, "all_zero": zero, "constant": constant}


def digest(t: torch.Tensor) -> str:
    """A content hash of dtype, shape and bytes, for finding duplicated tensors."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def conv_filters(w: torch.Tensor) -> dict | None:
    """Degenerate-filter fractions of a conv weight (O, I, k...) with a spatial kernel of
    more than one value, or None for any other tensor."""
    if w.ndim not in (3, 4, 5) or not w.is_floating_point() or w[0, 0].numel() < 2:
        return None
    kernels = w.detach().double().reshape(w.shape[0] * w.shape[1], -1)
    scale = float(kernels.abs().max())
    if scale == 0 or not torch.isfinite(kernels).all():
        near_zero = torch.ones(len(kernels), dtype=torch.bool)
        near_constant = torch.zeros(len(kernels), dtype=torch.bool)
    else:
        tol = DEGENERATE_TOLERANCE * scale
        near_zero = (kernels.abs() <= tol).all(dim=1)
        near_constant = ~near_zero & (kernels.std(dim=1, correction=0) <= tol)
    n = len(kernels)
    return {
        "filters": n,
        "near_zero": float(near_zero.sum()) / n,
        "near_constant": float(near_constant.sum()) / n,
    }


def dtype_anomalies(dtypes: dict[str, torch.dtype], config_dtype: str | None) -> list[str]:
    """Messages about unusual dtypes, given each tensor's dtype and config's torch_dtype."""
    floats = {n: d for n, d in dtypes.items() if d.is_floating_point}
    out = []
    doubles = [n for n, d in floats.items() if d == torch.float64]
    if doubles:
        out.append(
            f"{len(doubles)} float64 tensors (e.g. {doubles[0]}): twice the size of "
            "float32 for no accuracy gain; cast them"
        )
    if floats:
        main, _ = Counter(floats.values()).most_common(1)[0]
        odd = [n for n, d in floats.items() if d != main and d != torch.float64]
        if odd:
            out.append(
                f"{len(odd)} tensors are not {_name(main)} like the rest (e.g. {odd[0]} "
                f"is {_name(floats[odd[0]])}); mixed precision may be unintended"
            )
        if config_dtype and config_dtype not in {_name(d) for d in floats.values()}:
            out.append(
                f"config.json says torch_dtype {config_dtype} but the weights are {_name(main)}"
            )
    return out


def _name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")
