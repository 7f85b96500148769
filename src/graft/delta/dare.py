"""DARE as a patch: drop each delta entry at random and rescale the survivors (Yu et al.
2024, "Language Models are Super Mario").

Per tensor, each entry of δ is kept with probability p = ``density`` (an independent
Bernoulli mask, the same ``dare_mask`` graft's DARE merges use) and kept entries are
divided by exactly p, so the patch equals δ in expectation. Stored as a packed mask plus
the kept (rescaled) values in the delta's dtype.

Conventions: the mask of each tensor is drawn from a CPU generator seeded from ``seed``
and the tensor's name, so the same seed gives the same patch on any device and thread
count. At density 1 every entry is kept and nothing is rescaled: the patch is lossless.
"""

from __future__ import annotations

import torch

from graft.delta._bits import pack_bits
from graft.delta._spec import Compressor, check_density
from graft.merge.dare import dare_mask


def dare(
    delta: torch.Tensor,
    *,
    value_dtype: torch.dtype,
    generator: torch.Generator | None = None,
    density: float = 0.1,
    seed: int = 0,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Encode one float32 delta as ``("sparse", {mask, values})``; ``seed`` is used by the
    engine to seed ``generator``."""
    flat = delta.reshape(-1)
    keep = dare_mask(flat.shape, density, generator, flat.device)
    values = flat[keep] if density == 1 else flat[keep] / density
    return "sparse", {"mask": pack_bits(keep), "values": values.to(value_dtype).cpu()}


SPEC = Compressor(
    name="dare",
    summary="random drop with probability 1-density, survivors rescaled by 1/density (seeded)",
    params={"density": 0.1, "seed": 0},
    encode=dare,
    check=lambda p: (
        check_density(p["density"])
        or (None if isinstance(p["seed"], int) else f"seed must be an integer, got {p['seed']!r}")
    ),
    uses_seed=True,
)
