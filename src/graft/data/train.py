"""Training loops on any runner: fine-tuning a classifier, and linear probes on features.

One loop for every job that trains (the text zoo's fine-tunes; distillation and update
training reuse it through ``loss_fn``):

* minibatches drawn by epochs: each epoch a permutation of the examples from a numpy
  ``Generator(seed)``, so the data order is fixed by the seed;
* AdamW (no weight decay by default) over the parameters ``trainable`` selects, linear
  warm-up over ``warmup`` of the steps, then linear decay to zero (BERT's schedule);
* the module in train mode (dropout on) while training, in eval mode after.

Results are deterministic for a given seed and thread count on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from graft.data.dataset import Dataset
from graft.data.labels import DataError
from graft.data.runner import Runner

Loss = Callable[[torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """The example indices of each of ``steps`` minibatches (epoch by epoch, seeded)."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    perm = rng.permutation(n)
    pos = 0
    while len(out) < steps:
        if pos + batch_size > n:
            perm = np.concatenate([perm[pos:], rng.permutation(n)])
            pos = 0
        out.append(perm[pos : pos + batch_size])
        pos += batch_size
    return out


def finetune(
    runner: Runner,
    data: Dataset,
    *,
    steps: int,
    lr: float,
    batch_size: int = 16,
    seed: int = 0,
    trainable: Callable[[str], bool] | None = None,
    weight_decay: float = 0.0,
    warmup: float = 0.06,
    loss_fn: Loss | None = None,
    sparse_embeddings: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``runner.module`` in place on labelled ``data``.

    Args:
        runner: the model and its head (`graft.data.load_runner`).
        data: labelled examples, already mapped to the head's ids (``runner.prepare``).
        steps: optimiser steps.
        lr: peak learning rate.
        batch_size: examples per step.
        seed: fixes the data order.
        trainable: module parameter name -> whether to train it (default: all).
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps spent warming the learning rate up.
        loss_fn: ``(logits, labels, example indices) -> loss``; default cross-entropy.
        sparse_embeddings: train ``nn.Embedding`` tables with sparse gradients and lazy
            Adam (``torch.optim.SparseAdam``: only the rows a batch uses get a gradient and
            a moment update), so a 30k-row vocabulary costs what its used rows cost; no
            weight decay on them. The other parameters keep AdamW.
        progress: called with 1 after each step.

    Returns:
        The loss of every step.
    """
    if data.labels is None:
        raise DataError(f"{data.name} has no labels; training needs them")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise DataError("training needs steps >= 1, batch size >= 1 and a positive learning rate")
    module = runner.module
    params = [p for n, p in module.named_parameters() if trainable is None or trainable(n)]
    frozen = {n: p.requires_grad for n, p in module.named_parameters()}
    for n, p in module.named_parameters():
        p.requires_grad_(trainable is None or trainable(n))
    tables = _embedding_tables(module, params) if sparse_embeddings else []
    table_params = {id(t.weight) for t in tables}
    dense = [p for p in params if id(p) not in table_params]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay, foreach=True)
    ]
    if tables:
        opts.append(torch.optim.SparseAdam([t.weight for t in tables], lr=lr))
    warm = max(1, int(round(warmup * steps)))

    def factor(s: int) -> float:
        return min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts]
    was_sparse = [t.sparse for t in tables]
    for t in tables:
        t.sparse = True
    losses = []
    module.train()
    try:
        for idx in batch_order(len(data), steps, min(batch_size, len(data)), seed):
            part = data.subset(idx)
            inputs = runner.inputs(part, 0, len(part))
            logits = runner.logits(inputs)
            labels = torch.from_numpy(part.labels)
            loss = (
                nn.functional.cross_entropy(logits, labels)
                if loss_fn is None
                else loss_fn(logits, labels, idx)
            )
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sched in zip(opts, scheds, strict=True):
                o.step()
                sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(1)
    finally:
        module.eval()
        for t, flag in zip(tables, was_sparse, strict=True):
            t.sparse = flag
        for n, p in module.named_parameters():
            p.requires_grad_(frozen[n])
    return losses


def _embedding_tables(module: nn.Module, params: list[nn.Parameter]) -> list[nn.Embedding]:
    """The trainable ``nn.Embedding`` modules (each table once, tied ones excluded: a
    tied table also gets dense gradients from the output layer)."""
    trainable = {id(p) for p in params}
    uses: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    seen, out = set(), []
    for m in module.modules():
        w = getattr(m, "weight", None)
        ok = isinstance(m, nn.Embedding) and id(w) in trainable and uses[id(w)] == 1
        if ok and id(w) not in seen:
            seen.add(id(w))
            out.append(m)
    return out


def linear_probe(
    features: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    *,
    steps: int = 300,
    lr: float = 1e-2,
) -> nn.Linear:
    """A linear head on frozen features: full-batch Adam from a zero head, cross-entropy,
    no weight decay (the digits zoo's probe, on features computed once)."""
    head = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    opt = torch.optim.Adam(head.parameters(), lr=lr, foreach=True)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(features), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def trained_state(runner: Runner, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base`` (every tensor of the checkpoint the runner was loaded from) with the
    runner's trained parameters written over it, in the checkpoint's dtypes."""
    state = dict(base)
    for name, t in runner.state().items():
        state[name] = t.to(base[name].dtype).contiguous() if name in base else t.contiguous()
    return state
