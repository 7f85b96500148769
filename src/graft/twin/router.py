"""Twin-Merging's router: a small MLP from the shared expert's pooled features of an input
to one logit per task; ``softmax`` of them are the weights that mix the exclusive parts.

Lu et al. 2024, §3.3 "dynamic merging". The reference router (``SimpleMLP`` in
``discriminative/router.py``) reads the mean over tokens of the shared model's last
hidden state and is ``Linear(D, 2D) → BatchNorm → LeakyReLU → Dropout(0.5) → Linear(2D,
2D) → BatchNorm → LeakyReLU → Dropout(0.5) → Linear(2D, T)``, trained with cross-entropy
against the task id (Adam, lr 5e-4).

Conventions that change results:

* Input standardisation instead of BatchNorm: features are centred and scaled by the mean
  and standard deviation of the training features (stored with the router), then the
  same two hidden layers (width ``hidden``, default 2D), LeakyReLU (slope 0.01) and
  dropout 0.5 while training. A fixed standardisation behaves the same for one input or
  a batch, as BatchNorm in eval mode does.
* Training: Adam (lr 5e-4, no weight decay) on minibatches of at most 256 drawn epoch by
  epoch from a seeded permutation, for ``steps`` steps; initial weights from the same
  seed. Deterministic for a given seed on the CPU.
* Which pooled features: those graft's runner gives (`graft.data.Runner.features`:
  mean over real tokens by default, the head's or the sentence-transformers folder's
  pooling otherwise); the build records pooling and token length so evaluation reads the
  same features.
"""

from __future__ import annotations

import torch
from torch import nn

from graft.data.train import batch_order

SLOPE = 0.01
DROPOUT = 0.5
LR = 5e-4
MAX_BATCH = 256


class Router(nn.Module):
    """standardise → Linear → LeakyReLU → Dropout → Linear → LeakyReLU → Dropout → Linear."""

    def __init__(self, features: int, tasks: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, tasks)
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = (f.float() - self.mean) / self.std
        x = self.drop(nn.functional.leaky_relu(self.fc1(x), SLOPE))
        x = self.drop(nn.functional.leaky_relu(self.fc2(x), SLOPE))
        return self.fc3(x)

    def weights(self, f: torch.Tensor) -> torch.Tensor:
        """Routing weights (B, T): softmax of the logits, in eval mode."""
        self.eval()
        with torch.no_grad():
            return torch.softmax(self(f), dim=-1)


def train_router(
    features: torch.Tensor,
    tasks: torch.Tensor,
    num_tasks: int,
    *,
    hidden: int | None = None,
    steps: int = 1000,
    lr: float = LR,
    seed: int = 0,
) -> tuple[Router, list[float]]:
    """Fit a router to predict ``tasks`` (N,) from ``features`` (N, D).

    Returns:
        The router (eval mode) and the loss of every step.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(features.shape[1], num_tasks, hidden or 2 * features.shape[1])
        with torch.no_grad():
            router.mean.copy_(features.mean(0))
            router.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
        opt = torch.optim.Adam(router.parameters(), lr=lr)
        router.train()
        losses = []
        for order in batch_order(len(features), steps, min(MAX_BATCH, len(features)), seed):
            idx = torch.from_numpy(order)
            loss = nn.functional.cross_entropy(router(features[idx]), tasks[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    router.eval()
    return router, losses


def router_state(router: Router) -> dict[str, torch.Tensor]:
    """The router's tensors by name, for saving."""
    return {n: t.detach().float().contiguous() for n, t in router.state_dict().items()}


def router_from_state(state: dict[str, torch.Tensor]) -> Router:
    """Rebuild a router from `router_state`'s tensors (shapes give the sizes)."""
    hidden, features = state["fc1.weight"].shape
    router = Router(features, state["fc3.weight"].shape[0], hidden)
    router.load_state_dict(state)
    return router.eval()
