"""How one tensor's delta is stored in a patch, and how it is read back.

A *codec* names a storage layout; a compressor (`compeft`, `dare`, `lowrank`) chooses one
per tensor. Each stored part is a tensor named ``{tensor}::{part}`` in the patch, except
the single part of ``dense`` and ``replace``, stored under the tensor's own name so that
a dense delta file is an ordinary state dict.

* ``dense``: the delta itself.
* ``replace``: a non-float tensor (integer ids, masks) whose fine-tuned value replaces the
  base's; it is not a difference.
* ``sparse``: ``mask`` (packed bits, one per entry) and ``values`` (the kept entries in
  flat order).
* ``ternary``: ``mask`` and ``sign`` (packed bits, one per *kept* entry, 1 = positive)
  and ``scale`` (float32 scalar): kept entries are ``±scale``.
* ``lowrank``: ``B`` (out x r) and ``A`` (r x in); the delta is ``B @ A``.
* ``emr``: ``mask`` (packed bits, one per entry) and ``scale`` (float32 scalar) in the
  patch, ``values`` (float32, the tensor's shape) in the *shared* file the patch names
  (`SHARED_PARTS`), stored there under the tensor's own name: the delta is
  ``scale · mask ⊙ values`` (an EMR-merging task modulator over the unified task vector).

Decoders return float32 on the parts' device; they trust their inputs, which
`graft.delta.patch` checks once when a patch is opened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from graft.delta._bits import packed_size, unpack_bits

PARTS: dict[str, tuple[str, ...]] = {
    "dense": ("",),
    "replace": ("",),
    "sparse": ("mask", "values"),
    "ternary": ("mask", "sign", "scale"),
    "lowrank": ("B", "A"),
    "emr": ("mask", "scale", "values"),
}

# Parts a codec reads from the file its patch shares with others (``graft_shared``), not
# from the patch itself.
SHARED_PARTS: dict[str, tuple[str, ...]] = {"emr": ("values",)}


def part_name(tensor: str, part: str, codec: str | None = None) -> str:
    """The stored name of one part of a tensor's delta (a shared part of ``codec`` is
    stored under the tensor's own name, in the shared file)."""
    if part == "" or part in SHARED_PARTS.get(codec or "", ()):
        return tensor
    return f"{tensor}::{part}"


def expected_parts(codec: str, shape: tuple[int, ...]) -> dict[str, tuple | None]:
    """Shapes each part must have (None: checked when decoded), for opening a patch."""
    n = math.prod(shape)
    if codec in ("dense", "replace"):
        return {"": shape}
    if codec == "sparse":
        return {"mask": (packed_size(n),), "values": None}
    if codec == "ternary":
        return {"mask": (packed_size(n),), "sign": None, "scale": ()}
    if codec == "emr":
        return {"mask": (packed_size(n),), "scale": (), "values": shape}
    return {"B": None, "A": None}


def _sparse(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    mask = unpack_bits(parts["mask"], n).to(parts["values"].device)
    out = torch.zeros(n, dtype=torch.float32, device=mask.device)
    out[mask] = parts["values"].float()
    return out.view(shape)


def _ternary(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    mask = unpack_bits(parts["mask"], n)
    kept = int(mask.sum())
    positive = unpack_bits(parts["sign"], kept)
    scale = parts["scale"].float().cpu()
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = torch.where(positive, scale, -scale)
    return out.view(shape)


def _lowrank(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return (parts["B"].float() @ parts["A"].float()).view(shape)


def _emr(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    values = parts["values"].float()
    mask = unpack_bits(parts["mask"], math.prod(shape)).to(values.device).view(shape)
    return values * mask * parts["scale"].float().to(values.device)


def _dense(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return parts[""].float()


DECODERS: dict[str, Callable[[Mapping[str, torch.Tensor], tuple[int, ...]], torch.Tensor]] = {
    "dense": _dense,
    "sparse": _sparse,
    "ternary": _ternary,
    "lowrank": _lowrank,
    "emr": _emr,
}


def decode(codec: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 delta a tensor's stored parts describe (not for ``replace``)."""
    return DECODERS[codec](parts, shape)
