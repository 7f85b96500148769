"""A lossless sparse patch: every non-zero entry of the delta, nothing else.

For deltas that are sparse by construction (`graft sft`'s lottery-ticket fine-tunes, a
masked fine-tune): stored as a packed mask of the entries ``δ ≠ 0`` plus their values in
the delta's dtype, the ``sparse`` codec of `graft.delta.codecs`. Decoding gives δ back
bit for bit (a ``-0.0`` entry is stored as ``+0.0``, which adds the same).
"""

from __future__ import annotations

import torch

from graft.delta._bits import pack_bits
from graft.delta._spec import Compressor


def nonzero(
    delta: torch.Tensor, *, value_dtype: torch.dtype, generator: torch.Generator | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """Encode one float32 delta as ``("sparse", {mask, values})`` of its non-zeros."""
    flat = delta.reshape(-1)
    keep = flat != 0  # NaN != 0: kept, so a non-finite entry travels (the engine warns)
    return "sparse", {"mask": pack_bits(keep), "values": flat[keep].to(value_dtype).cpu()}


SPEC = Compressor(
    name="nonzero",
    summary="every non-zero entry, losslessly (for sparse fine-tunes: graft sft)",
    params={},
    encode=nonzero,
)
