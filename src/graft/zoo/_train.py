"""Training loops of the digits zoo: minibatch fine-tuning, linear probes, weight averages.

Deterministic given the seeds passed in (data order and augmentation draw from a
``torch.Generator``); the caller fixes torch's global seed for initialisations and runs
single-threaded for bit-reproducible reductions.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def train(
    backbone: nn.Module,
    head: nn.Linear,
    X,
    y,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    shift: float = 0.0,
) -> tuple[nn.Module, nn.Linear]:
    """Trained copies of ``backbone`` and ``head``: minibatch AdamW (no weight decay) on
    both, data order from ``seed``; the inputs are left untouched.

    ``shift``: probability that a training image is moved by one pixel (random direction).
    """
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    gen = torch.Generator().manual_seed(seed)
    shifted = _shifted_copies(X) if shift > 0 else None
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    backbone.train()
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            xb = X[idx] if shifted is None else shifted[idx, _shift_choice(len(idx), shift, gen)]
            loss = nn.functional.cross_entropy(head(backbone(xb)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return backbone.eval(), head.eval()


def _shift_choice(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Index into `_shifted_copies`: 4 (unshifted) with probability 1-p, else one of 8 moves."""
    move = torch.randint(8, (n,), generator=gen)
    move = move + (move >= 4).long()  # skip the centre
    return torch.where(torch.rand(n, generator=gen) < p, move, torch.full_like(move, 4))


def _shifted_copies(X: torch.Tensor) -> torch.Tensor:
    """(N, 9, 1, 8, 8): each image moved by -1/0/+1 pixels in each direction, zero-filled."""
    padded = nn.functional.pad(X, (1, 1, 1, 1))
    return torch.stack(
        [padded[..., 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
        dim=1,
    )


def probe(backbone: nn.Module, X, y, num_classes: int, *, steps: int, lr: float) -> nn.Linear:
    """Linear probe: full-batch Adam from a zero head on frozen features."""
    with torch.no_grad():
        feats = backbone(X)
    head = nn.Linear(feats.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr, foreach=True)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def average(modules: list[nn.Module]) -> nn.Module:
    """A module holding the uniform average of the modules' weights."""
    out = copy.deepcopy(modules[0])
    states = [m.state_dict() for m in modules]
    out.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    return out
