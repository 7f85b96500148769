"""Reading a module's intermediate activations with forward hooks, token rows only.

Activations of shape ``(B, L, n)`` keep the rows whose ``attention_mask`` is set (padding
never counts); ``(B, n)`` rows are kept as they are. A run can stop once every
site it needs has fired (``stop=True``), so a layer-by-layer pass costs a partial forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress

import torch
from torch import nn


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early (caught by `run`)."""


def rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, L, n)`` -> the ``(tokens, n)`` rows where ``mask`` is set; ``(B, n)`` as is."""
    if x.dim() == 3:
        return x[mask.bool()] if mask is not None and mask.shape == x.shape[:2] else x.flatten(0, 1)
    return x.reshape(x.shape[0], -1) if x.dim() != 2 else x


@contextmanager
def capture(
    module: nn.Module, sites: Sequence[tuple[str, str]], *, stop: bool = False
) -> Iterator[dict[tuple[str, str], torch.Tensor]]:
    """Hooks on ``module``'s submodules; yields a dict ``(name, "in"|"out") -> activation``
    filled by each forward pass (first positional input, or the output's first tensor).

    ``stop``: cut the forward pass short once every site has been seen (`run` empties the
    dict before each pass).
    """
    found = dict(module.named_modules())
    store: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(mod, args, out):
            if (name, "in") in wanted:
                store[(name, "in")] = args[0].detach()
            if (name, "out") in wanted:
                store[(name, "out")] = (out[0] if isinstance(out, tuple) else out).detach()
            if stop and len(store) == len(wanted):
                raise _Stop

        return fn

    wanted = set(sites)
    for name in {n for n, _ in sites}:
        handles.append(found[name].register_forward_hook(hook(name)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run(module: nn.Module, inputs: Mapping[str, torch.Tensor], store: dict | None = None) -> None:
    """``module(**inputs)`` without gradients, ending quietly where a hook stops it;
    ``store`` (a `capture` dict) is emptied first."""
    if store is not None:
        store.clear()
    with torch.no_grad(), suppress(_Stop):
        module(**inputs)
