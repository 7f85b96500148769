"""The dynamic Twin-Merging model: the shared expert with each input's routed mix of the
exclusive parts, ``θ(x) = θ* + Σₜ softmax(r(x))ₜ τₜ`` (Lu et al. 2024, eq. 4).

Two ways to run it, the same model:

* ``routing="input"`` (the paper's, per input): the mix is never materialised. Forward
  hooks on the shared model's layers add each example's share of the low-rank parts, as
  a mixture of LoRA-style adapters: a Linear gets ``((x Aᵀ) ⊙ w) Bᵀ`` with the factors
  of all tasks side by side and ``w`` each example's weight of the task owning each
  column; an Embedding ``(B[ids] ⊙ w) A``; biases and LayerNorm's scale and shift their
  weighted dense parts. Cost per token ≈ T·r·(in + out) per layer, whatever the batch.
  Supported layers: ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm`` and transformers'
  ``Conv1D`` (GPT-2); any other layer with an exclusive part is refused.
* ``routing="batch"``: one mix per batch, with the batch's mean routing weights (the
  mean of each example's softmax), materialised and run through ``functional_call`` —
  any architecture. With batch size 1 it is the per-input model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from graft.data import DataError, Dataset, Runner
from graft.data.passes import scores
from graft.twin.exclusive import as_factors
from graft.twin.router import Router

ROUTINGS = ("input", "batch")


@dataclass
class Stack:
    """Every task's exclusive part of one tensor.

    Attributes:
        shape: the tensor's shape.
        b, a: for a matrix, the tasks' factors side by side: ``b`` (out × R), ``a``
            (R × in), ``R = Σₜ rₜ``; task t's part is ``b[:, cols] @ a[cols]``.
        owner: (R,) the task each inner column belongs to.
        dense: for other tensors, (T, *shape), zero for a task without a part.
    """

    shape: tuple[int, ...]
    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def mixed(self, weights: torch.Tensor) -> torch.Tensor:
        """``Σₜ wₜ τₜ`` for routing weights (T,)."""
        if self.dense is not None:
            return torch.tensordot(weights.float(), self.dense, dims=1)
        return (self.b * weights.float()[self.owner]) @ self.a


def build_stacks(
    parts: list[Mapping[str, tuple[str, dict[str, torch.Tensor]]]],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, Stack]:
    """Stacks from each task's stored parts (``{tensor: (codec, parts)}``, as a patch
    stores them); a tensor no task stores has no stack."""
    stacks = {}
    for name, shape in shapes.items():
        present = [(t, p[name]) for t, p in enumerate(parts) if name in p]
        if not present:
            continue
        if len(shape) == 2:
            factors = [(t, *as_factors(codec, stored)) for t, (codec, stored) in present]
            stacks[name] = Stack(
                shape,
                b=torch.cat([b for _, b, _ in factors], 1),
                a=torch.cat([a for _, _, a in factors], 0),
                owner=torch.cat([torch.full((b.shape[1],), t) for t, b, _ in factors]),
            )
        else:
            dense = torch.zeros(len(parts), *shape)
            for t, (_, stored) in present:
                dense[t] = stored[""].float().reshape(shape)
            stacks[name] = Stack(shape, dense=dense)
    return stacks


def mixed_state(
    shared: Mapping[str, torch.Tensor], stacks: Mapping[str, Stack], weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``θ* + Σₜ wₜ τₜ`` for every tensor with an exclusive part (others: as ``shared``)."""
    return {n: shared[n].float() + s.mixed(weights) for n, s in stacks.items() if n in shared}


# --- per-input routing: hooks ----------------------------------------------------------


class _Weights:
    """The current batch's routing weights (B, T), read by the hooks."""

    value: torch.Tensor | None = None


def _per_example(w: torch.Tensor, x: torch.Tensor, where: str) -> torch.Tensor:
    # A layer may see one row for the whole batch (BERT's position ids are (1, L)): its
    # output then gets a row per example, which the model broadcasts as it would.
    if x.shape[0] not in (1, w.shape[0]):
        raise DataError(
            f"per-input routing: {where} sees {x.shape[0]} rows for a batch of {w.shape[0]}; "
            "run it with --routing batch"
        )
    return w


def _expand(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, K) viewed as (B, 1, ..., 1, K) with ``ndim`` dimensions in all."""
    return t.reshape(t.shape[0], *([1] * (ndim - 2)), t.shape[-1])


def _low_rank(x_in: torch.Tensor, s: Stack, w: torch.Tensor, first_a: bool) -> torch.Tensor:
    """Each row's ``Σₜ wₜ x τₜᵀ`` (Linear: τ = B A, x τᵀ = (x Aᵀ) Bᵀ) or ``Σₜ wₜ x τₜ``
    (Conv1D's input-first layout: x τ = (x B) A)."""
    cols = _expand(w[:, s.owner], x_in.ndim)
    if first_a:
        return ((x_in @ s.a.T) * cols) @ s.b.T
    return ((x_in @ s.b) * cols) @ s.a


def _dense_term(s: Stack, w: torch.Tensor, ndim: int) -> torch.Tensor:
    """Each row's ``Σₜ wₜ τₜ`` of a dense part, shaped to broadcast over ``ndim`` dims."""
    mixed = w.float() @ s.dense.reshape(len(s.dense), -1)
    return mixed.reshape(len(w), *([1] * (ndim - 1 - len(s.shape))), *s.shape)


def _hook(module: nn.Module, stacks: dict[str, Stack], weights: _Weights, where: str):
    kind = type(module).__name__
    ws, bs = stacks.get("weight"), stacks.get("bias")

    def linear(mod, inputs, out):
        if weights.value is None:
            return out
        x = inputs[0]
        w = _per_example(weights.value, x, where)
        if ws is not None:
            out = out + _low_rank(x, ws, w, first_a=kind != "Conv1D")
        if bs is not None:
            out = out + _dense_term(bs, w, out.ndim)
        return out

    def embedding(mod, inputs, out):
        if weights.value is None:
            return out
        ids = inputs[0]
        w = _per_example(weights.value, ids, where)
        cols = _expand(w[:, ws.owner], out.ndim)
        return out + (nn.functional.embedding(ids, ws.b) * cols) @ ws.a

    def layer_norm(mod, inputs, out):
        if weights.value is None:
            return out
        x = inputs[0]
        w = _per_example(weights.value, x, where)
        n = nn.functional.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        scale = mod.weight if ws is None else mod.weight + _dense_term(ws, w, x.ndim)
        shift = mod.bias if bs is None else mod.bias + _dense_term(bs, w, x.ndim)
        return n * scale + (0 if shift is None else shift)

    if isinstance(module, nn.Linear) or kind == "Conv1D":
        return linear
    if isinstance(module, nn.Embedding) and bs is None and module.max_norm is None:
        return embedding
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return layer_norm
    raise DataError(
        f"per-input routing cannot run layer {where} ({kind}) of the model with an exclusive "
        "part; it supports Linear, Embedding, LayerNorm and Conv1D. Use --routing batch"
    )


@contextmanager
def routed(runner: Runner, stacks: Mapping[str, Stack]) -> Iterator[_Weights]:
    """Hooks on ``runner.module`` that add each example's mix of ``stacks``; yields the
    holder whose ``value`` (B, T) the caller sets per batch (None: the shared model)."""
    by_module: dict[str, dict[str, Stack]] = {}
    for param, name in runner.names.items():
        if name in stacks:
            path, _, leaf = param.rpartition(".")
            by_module.setdefault(path, {})[leaf] = stacks[name]
    weights = _Weights()
    handles = []
    try:
        for path, own in by_module.items():
            module = runner.module.get_submodule(path)
            handles.append(module.register_forward_hook(_hook(module, own, weights, path)))
        yield weights
    finally:
        for h in handles:
            h.remove()


# --- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def predict_twin(
    runner: Runner,
    router_runner: Runner,
    router: Router,
    stacks: Mapping[str, Stack],
    data: Dataset,
    *,
    routing: str = "input",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) of the dynamic model and each example's routing weights (N, T).

    Args:
        runner: the shared expert with the head to judge by (weights as loaded).
        router_runner: the shared expert as the router reads it (its pooling, length).
        router, stacks: the router and the exclusive parts (`build_stacks`).
        routing: ``input`` or ``batch`` (module docstring).
    """
    runner.module.eval()
    router_runner.module.eval()
    shared = runner.state() if routing == "batch" else {}
    logits, routes = [], []
    with routed(runner, stacks if routing == "input" else {}) as holder:
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            holder.value = None  # the router reads the shared model (``runner`` may be it)
            w = router.weights(router_runner.features(router_runner.inputs(data, start, stop)))
            inputs = runner.inputs(data, start, stop)
            if routing == "input":
                holder.value = w
                z = runner.logits(inputs)
            else:
                params = mixed_state(shared, stacks, w.mean(0))
                z = runner.logits(inputs, params)
            logits.append(z.double().numpy())
            routes.append(w.double().numpy())
            if progress is not None:
                progress(stop - start)
    if not logits:
        return np.zeros((0, runner.num_classes or 0)), np.zeros((0, len(router.fc3.bias)))
    return np.concatenate(logits), np.concatenate(routes)


def evaluate_twin(
    runner: Runner,
    router_runner: Runner,
    router: Router,
    stacks: Mapping[str, Stack],
    data: Dataset,
    *,
    tasks: list[str],
    routing: str = "input",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """``{"accuracy", "loss", "n", "routing", "routed"}`` of the dynamic model on labelled
    ``data``: ``routing`` holds each task's mean routing weight over the examples,
    ``routed`` the share of examples whose largest weight is that task's."""
    data = runner.prepare(data)
    z, w = predict_twin(
        runner,
        router_runner,
        router,
        stacks,
        data,
        routing=routing,
        batch_size=batch_size,
        progress=progress,
    )
    out = scores(z, data.labels)
    if len(w):
        top = np.bincount(w.argmax(1), minlength=len(tasks)) / len(w)
        out["routing"] = {t: float(m) for t, m in zip(tasks, w.mean(0), strict=True)}
        out["routed"] = {t: float(m) for t, m in zip(tasks, top, strict=True)}
    return out
