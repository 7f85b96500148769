"""Lottery-ticket sparse fine-tuning (LT-SFT; Ansell, Ponti, Korhonen & Vulić 2022,
"Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL, arXiv:2110.07560).

1. **Full fine-tune** the model from θ₀ for ``steps`` steps (every weight it is saved
   with, head included): θ₁.
2. **Select** the mask: the ``K = round(density · N)`` backbone entries that moved most,
   ``|θ₁ − θ₀|``, ranked over the whole backbone at once (the paper's global top-K; ties
   to the lower position in parameter order, then flat order).
3. **Reset** every weight to θ₀ and **re-train** for ``reset_steps`` steps with only the
   masked backbone entries free (their gradients pass, the others' are zeroed; AdamW
   without weight decay then leaves the others exactly at θ₀). The head is trained
   densely in both phases: it is the task's own and is kept apart, as graft keeps heads.

The backbone's change, φ = θ₂ − θ₀, has at most K non-zero entries. ``graft sft`` writes
θ₂ as a model folder and, with ``--patch``, φ as a sparse graft patch (`graft.delta`'s
``nonzero`` codec, lossless), so that several (a task's and a domain's) compose by
addition: ``graft apply BASE task.safetensors domain.safetensors -o OUT``.

Conventions: no weight decay in either phase (the paper's re-training must not move the
frozen entries); the same learning-rate schedule, seed and data order in both phases;
the mask counts only the backbone (embeddings included), not the head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from graft.data import DataError, Dataset, Runner
from graft.data.train import finetune
from graft.delta._spec import check_density as density_problem
from graft.distill.run import ProgressFactory, _no_bar, saved_parameters


def top_k_mask(moved: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks of the ``k`` largest ``|moved|`` entries over all tensors together
    (ties to the earlier tensor in ``moved``'s order, then the lower flat index)."""
    names = list(moved)
    flat = torch.cat([moved[n].detach().abs().reshape(-1).float() for n in names])
    if not 0 <= k <= flat.numel():
        raise DataError(f"cannot keep {k} of {flat.numel()} entries")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    out, start = {}, 0
    for n in names:
        size = moved[n].numel()
        out[n] = keep[start : start + size].view(moved[n].shape)
        start += size
    return out


def check_density(density: float) -> None:
    """Raises `DataError` unless ``density`` is in (0, 1] (`graft.delta`'s bound)."""
    if (problem := density_problem(density)) is not None:
        raise DataError(f"--{problem}")


def lt_sft(
    runner: Runner,
    data: Dataset,
    *,
    density: float,
    steps: int,
    reset_steps: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    progress: ProgressFactory | None = None,
) -> dict:
    """Sparse-fine-tune ``runner`` in place on labelled ``data`` (module docstring).

    Returns:
        ``kept`` (K), ``backbone_entries`` (N), ``changed`` (entries of θ₂ ≠ θ₀), the
        losses of both phases, and ``masks`` (tensor name -> bool mask, not for JSON).

    Raises:
        DataError: density outside (0, 1], unlabelled data, bad steps.
    """
    check_density(density)
    if data.labels is None:
        raise DataError(f"{data.name} has no labels; sparse fine-tuning trains on labels")
    reset_steps = steps if reset_steps is None else reset_steps
    bar = progress or _no_bar
    module = runner.module
    trainable = saved_parameters(runner)
    backbone = [n for n, _ in module.named_parameters() if trainable(n) and not _is_head(n)]
    if not backbone:
        raise DataError(f"{runner.path} has no backbone weights to sparse-fine-tune")
    params = dict(module.named_parameters())
    total = sum(params[n].numel() for n in backbone)
    if round(density * total) < 1:
        raise DataError(
            f"--density {density:g} of {total:,} backbone entries frees none; sparse "
            f"fine-tuning needs at least {1 / total:.2g}"
        )
    theta0 = {n: t.detach().clone() for n, t in module.state_dict().items()}

    def train(label: str, n_steps: int, sparse: bool) -> list[float]:
        with bar(label, n_steps, "steps") as hook:
            return finetune(
                runner, data, steps=n_steps, lr=lr, batch_size=batch_size, seed=seed,
                trainable=trainable, weight_decay=0.0, sparse_embeddings=sparse,
                progress=hook,
            )  # fmt: skip

    first = train("full fine-tune", steps, runner.kind == "transformers")
    moved = {n: params[n].detach() - theta0[n] for n in backbone}
    k = int(round(density * total))
    masks = top_k_mask(moved, k)
    with torch.no_grad():
        module.load_state_dict(theta0)
    handles = [params[n].register_hook(_masked(masks[n])) for n in backbone]
    try:
        second = train("sparse re-train", reset_steps, False)
    finally:
        for h in handles:
            h.remove()
    changed = sum(int((params[n].detach() != theta0[n]).sum()) for n in backbone)
    return {
        "density": density,
        "kept": k,
        "backbone_entries": sum(m.numel() for m in masks.values()),
        "changed": changed,
        "loss_full": [first[0], first[-1]],
        "loss_sparse": [second[0], second[-1]],
        "settings": dict(
            steps=steps, reset_steps=reset_steps, lr=lr, batch_size=batch_size, seed=seed
        ),  # fmt: skip
        "masks": masks,
    }


def _is_head(name: str) -> bool:
    return name.startswith("head.")


def _masked(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda grad: grad * mask.to(grad.dtype)
