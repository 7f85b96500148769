"""Deltas between checkpoints: diff, apply, transfer across base versions, compressed
patches (ComPEFT, DARE, low-rank, lossless non-zeros) and LoRA adapters in and out.

Compressors live one per module; this module lists them explicitly and ``get_compressor``
is the one lookup, whose error names every valid method.
"""

from __future__ import annotations

from graft.delta import compeft, dare, lowrank, nonzero
from graft.delta._spec import Compressor
from graft.delta.patch import Delta, DeltaError, open_delta

COMPRESSORS: dict[str, Compressor] = {
    "compeft": compeft.SPEC,
    "dare": dare.SPEC,
    "lowrank": lowrank.SPEC,
    "nonzero": nonzero.SPEC,
}


def get_compressor(name: str) -> Compressor:
    """The registered compressor called ``name``.

    Raises:
        DeltaError: no such compressor; the message lists the valid names.
    """
    try:
        return COMPRESSORS[name]
    except KeyError:
        valid = ", ".join(sorted(COMPRESSORS))
        raise DeltaError(f"unknown compression method {name!r}; valid: {valid}") from None


__all__ = ["COMPRESSORS", "Compressor", "Delta", "DeltaError", "get_compressor", "open_delta"]
