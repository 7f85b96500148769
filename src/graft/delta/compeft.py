"""ComPEFT: sparsify and ternary-quantize a delta (Yadav et al. 2023, "ComPEFT: Compression
for Communicating Parameter Efficient Updates via Sparsification and Quantization").

Per tensor: σ = std of the dense delta δ (before pruning); keep the ``density`` fraction of
entries with the largest |δ| (top-k per tensor, exact; ties go to the lower flat index);
replace each kept entry by ``sign(δ)·α·σ``. Stored as two bit arrays (a mask over all
entries, a sign per kept entry) and one float32 scale per tensor, so a tensor of n entries
takes ``n/8 + k/8 + 4`` bytes instead of ``n·itemsize``.

Conventions that change results:

* k = round(density·n), at least 1; entries that are exactly 0 are never kept (they have
  no sign), so a sparse delta may keep fewer.
* σ is the population standard deviation (``correction=0``) of the whole dense delta.
* α (``alpha``, default 1) is ComPEFT's scale multiplier, a hyperparameter the paper
  tunes on validation data; graft does not tune it.
* ``quantize: false`` skips the ternary step: the kept entries are stored as values in the
  delta's dtype (a plain top-k sparse delta; at density 1 this is lossless).
"""

from __future__ import annotations

from typing import Any

import torch

from graft.delta._bits import pack_bits
from graft.delta._spec import Compressor, check_density
from graft.merge._select import top_k_mask


def compeft(
    delta: torch.Tensor,
    *,
    value_dtype: torch.dtype,
    generator: torch.Generator | None = None,
    density: float = 0.1,
    alpha: float = 1.0,
    quantize: bool = True,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Encode one float32 delta; returns ``("ternary" | "sparse", parts)``."""
    flat = delta.reshape(-1)
    n = flat.numel()
    k = max(1, round(density * n)) if n else 0
    keep = top_k_mask(flat.abs(), k) & (flat != 0)
    if not quantize:
        return "sparse", {"mask": pack_bits(keep), "values": flat[keep].to(value_dtype).cpu()}
    sigma = flat.std(correction=0) if n else flat.new_zeros(())
    scale = (alpha * sigma).to(device="cpu", dtype=torch.float32).reshape(())
    signs = flat[keep] > 0
    return "ternary", {"mask": pack_bits(keep), "sign": pack_bits(signs), "scale": scale}


def _check(p: dict[str, Any]) -> str | None:
    if not isinstance(p["alpha"], int | float) or p["alpha"] <= 0:
        return f"alpha must be a positive number, got {p['alpha']!r}"
    return check_density(p["density"])


SPEC = Compressor(
    name="compeft",
    summary="top-k per tensor, signs and mask as bits, one scale alpha*sigma per tensor",
    params={"density": 0.1, "alpha": 1.0, "quantize": True},
    encode=compeft,
    check=_check,
)
