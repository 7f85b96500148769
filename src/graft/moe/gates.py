"""Router (gate) weights for a MoE built from dense experts, as pure tensor functions.

mergekit-moe's conventions (``mergekit/moe/router.py``), kept here because each changes
the router it gives:

* One gate row per expert and layer, shape ``(num_experts, hidden)`` per layer.
* ``random``: ``N(0, 1)`` entries, unnormalised; ``uniform_random``: ``U(-s, s)`` with
  ``s = 1/sqrt(hidden)`` (``torch.nn.Linear``'s initialisation). Shared experts draw their
  rows from the same tensor, after the routed experts'.
* Prompt modes: a vector for the positive prompts, minus one for the negative prompts when
  there are any, then scaled to unit L2 norm per layer (norms below 1e-8 count as 1e-8).
* ``cheap_embed``: the token embeddings of every prompt's tokens (the BOS token mergekit
  prepends included, padding excluded) summed over tokens and prompts and scaled to unit
  norm, the same row for every layer. Because each side is normalised before the
  subtraction, positive and negative prompts weigh equally whatever their lengths.
* ``hidden`` / ``hidden_last``: each prompt's hidden state *entering* each decoder layer
  (``output_hidden_states[:-1]``: the embeddings for layer 0, layer ``i - 1``'s output for
  layer ``i``) at its last token; ``hidden_avg``: its mean over the prompt's tokens. Either
  is averaged over prompts (not normalised) before the subtraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EPS = 1e-8


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each last-dimension vector scaled to unit L2 norm (norm clamped at 1e-8)."""
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def random_gates(
    num_layers: int, num_experts: int, hidden: int, *, uniform: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random gate rows, ``(num_layers, num_experts, hidden)`` float32: ``N(0, 1)``, or with
    ``uniform`` ``U(-1/sqrt(hidden), 1/sqrt(hidden))``."""
    shape = (num_layers, num_experts, hidden)
    if not uniform:
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def cheap_embed_vector(embed: torch.Tensor, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The unit-norm sum of the embedding rows of every token of every prompt, ``(hidden,)``.

    Args:
        embed: the ``(vocab, hidden)`` input embedding matrix.
        prompts: each prompt's token ids, 1-D.
    """
    total = torch.zeros(embed.shape[1], dtype=torch.float32)
    for ids in prompts:
        total += embed[ids].float().sum(dim=0)
    return unit_rows(total)


def reduce_hidden(hidden: torch.Tensor, *, average: bool) -> torch.Tensor:
    """One prompt's per-layer vectors: ``(layers, tokens, hidden)`` -> ``(layers, hidden)``,
    the last token's state, or with ``average`` the mean over tokens."""
    return hidden.float().mean(dim=1) if average else hidden[:, -1, :].float()


def mean_over_prompts(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of per-prompt ``(layers, hidden)`` vectors."""
    return torch.stack(list(vectors)).mean(dim=0)


def gate_rows(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """An expert's gate row per layer: ``unit(positive - negative)``, ``(layers, hidden)``."""
    return unit_rows(positive if negative is None else positive - negative)


def degenerate_layers(gates: torch.Tensor, *, threshold: float = 5.0) -> list[int]:
    """Layers whose gate matrix ``(experts, hidden)`` has a condition number above
    ``threshold`` (mergekit's warning): near-parallel rows, so some experts get few tokens.

    Args:
        gates: ``(layers, experts, hidden)``.
    """
    if gates.shape[1] < 2:
        return []
    conds = torch.linalg.cond(gates.double())
    return [i for i, c in enumerate(conds.tolist()) if not c <= threshold]
