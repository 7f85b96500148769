"""Bit packing for masks and signs: eight booleans per byte (numpy.packbits, big-endian
bit order within each byte, the last byte zero-padded)."""

from __future__ import annotations

import numpy as np
import torch


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape, read in flat order) into ``ceil(n / 8)`` uint8."""
    flat = bits.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` booleans of a `pack_bits` result, as a flat bool tensor.

    Raises:
        ValueError: ``packed`` holds fewer than ``n`` bits.
    """
    if packed.numel() * 8 < n:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than {n} bits")
    raw = packed.detach().reshape(-1).to(device="cpu", dtype=torch.uint8).numpy()
    return torch.from_numpy(np.unpackbits(raw, count=n).astype(bool))


def packed_size(n: int) -> int:
    """Bytes `pack_bits` uses for ``n`` booleans."""
    return (n + 7) // 8
