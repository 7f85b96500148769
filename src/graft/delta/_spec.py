"""What a compressor is: a name, its parameters with defaults, and a pure encode function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# encode(delta float32, *, value_dtype, generator, **params) -> (codec, {part: tensor})
Encode = Callable[..., tuple[str, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Compressor:
    """A registered compression method.

    Attributes:
        name: the ``--method`` name.
        summary: one line for ``--help`` and the docs.
        params: parameter name -> default.
        encode: the pure tensor function (see `Encode`).
        check: problems with the parameters as a whole (message) or None.
        check_tensor: problems with one tensor's shape under the parameters, or None.
        uses_seed: the engine passes a per-tensor seeded ``generator``.
        needs_finite: NaN or Inf in a delta is an error (the method factorizes it).
        describe: lines about a finished patch (its layout: tensor -> codec and shape)
            worth telling the user.
    """

    name: str
    summary: str
    params: Mapping[str, Any]
    encode: Encode
    check: Callable[[Mapping[str, Any]], str | None] = lambda p: None
    check_tensor: Callable[[str, tuple[int, ...], Mapping[str, Any]], str | None] = (
        lambda name, shape, p: None
    )
    uses_seed: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    needs_finite: bool = False
    describe: Callable[[Mapping[str, dict], Mapping[str, Any]], list[str]] | None = None


def check_density(value: Any) -> str | None:
    if not isinstance(value, int | float) or not 0 < value <= 1:
        return f"density must be in (0, 1], got {value!r}"
    return None
