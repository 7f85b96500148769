"""Building a Twin-Merging folder (`graft.twin.files`) from a base, its fine-tunes and
validation data of each task.

The steps of Lu et al. 2024, in order, each through graft's own machinery:

1. **shared expert** θ*: a recipe (task arithmetic, ``λ = 0.3`` by default — the
   reference runs 0.29 — or TIES) planned and run by the streaming engine into
   ``shared/``;
2. **exclusive parts** τₜ = θₜ − θ*: one streaming pass per task, each tensor compressed
   by `graft.twin.exclusive.compress_exclusive` into ``exclusive/<task>.safetensors``;
3. **router**: the shared model's pooled features of each task's validation examples,
   labelled with the task's index, fit by `graft.twin.router.train_router`.

Everything is written into a hidden temp folder and renamed into place at the end, so a
failure at any step leaves nothing at the output path.

Storage (the manifest's ``storage``): tensor payload bytes of the shared model, of every
exclusive part and of the router, against the T fine-tunes' payload — what keeping all
fine-tunes would cost.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from graft.data import DataError, DataOptions, Dataset, features, load_runner, read_data
from graft.data.resolve import default_zoo, zoo_head
from graft.delta import codecs
from graft.delta._common import delta_metadata
from graft.io import (
    SpoolWriter,
    atomic_output_dir,
    open_checkpoint,
    save_statistics,
    write_text,
)
from graft.plan import default_threads, plan_merge, run_pass, run_plan, tensor_seed
from graft.recipe import RecipeError, parse_recipe
from graft.twin.exclusive import compress_exclusive
from graft.twin.files import FORMAT, MANIFEST, ROUTER_KIND
from graft.twin.router import router_state, train_router

SHARED_METHODS = {"task_arithmetic": 0.3, "ties": 1.0}  # method -> default lambda
TIES_DENSITY = 0.2
DEFAULT_KEEP = 0.1
Log = Callable[[str], None]


@dataclass
class TwinReport:
    """What a build did."""

    out: Path
    tasks: list[str]
    storage: dict[str, int]
    router_accuracy: float
    router_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _names(given: Sequence[str] | None, datasets: Sequence[Dataset]) -> list[str]:
    if given is None:
        return task_names([d.task or Path(d.name).stem for d in datasets])
    if len(given) != len(datasets) or len(set(given)) != len(given):
        raise RecipeError(f"give one distinct task name per data set, got {list(given)}")
    if task_names(list(given)) != list(given):
        raise RecipeError(f"task names become file names; use letters, digits, . _ -: {given}")
    return list(given)


def task_names(raw_names: Sequence[str]) -> list[str]:
    """File-safe, unique names (other characters become ``_``; repeats get ``-2``...)."""
    names: list[str] = []
    for raw in raw_names:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", raw).lstrip(".") or "task"
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def shared_recipe(
    method: str, base: str, finetuned: Sequence[str], lam: float, density: float | None
) -> str:
    """The YAML recipe of the shared expert."""
    per_model: dict = {"weight": 1.0}
    shared: dict = {"lambda": lam}
    if method == "task_arithmetic":
        if density is not None:
            raise RecipeError(
                "--density applies to the ties shared expert; task_arithmetic keeps every "
                "entry (pass --method ties to trim)"
            )
        shared["normalize"] = False
    else:
        per_model["density"] = TIES_DENSITY if density is None else density
    doc = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": m, "parameters": dict(per_model)} for m in finetuned],
        "parameters": shared,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def build_twin(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    data: Sequence[str | Dataset],
    out: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    head: str | os.PathLike | None = None,
    method: str = "task_arithmetic",
    lam: float | None = None,
    density: float | None = None,
    keep: float | None = None,
    rank: int | None = None,
    router_steps: int = 1000,
    router_hidden: int | None = None,
    seed: int = 0,
    zoo: str | os.PathLike | None = None,
    split: str = "val",
    options: DataOptions | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    threads: int | None = None,
    force: bool = False,
    overwrite_anything: bool = False,
    log: Log = lambda m: None,
) -> TwinReport:
    """Write the Twin-Merging folder ``out`` (module docstring).

    Args:
        base: the pretrained model the fine-tunes share.
        finetuned: one fine-tune per task.
        data: validation inputs of each task, one per fine-tune in order: data specs
            (paths, ``task:NAME``) or data sets (labels are not read: the task index is
            the router's label).
        names: the tasks' names (default: a zoo task's name, else the file's stem).
        head: a head whose pooling and token length the router's features use (default:
            a zoo task's head for the first data set, else the model's defaults).
        method, lam, density: the shared expert's merge (`SHARED_METHODS`; ``density``
            for TIES, default 0.2).
        keep, rank: the exclusive parts' truncation (`graft.twin.exclusive`); at most
            one (default: keep 0.1, the paper's).
        router_steps, router_hidden, seed: router training (`graft.twin.router`).
        zoo, split, options, pooling, max_length: how data is read and featurised (a zoo
            task's head sets the default pooling and token length).
        threads, force, overwrite_anything: as for ``graft merge``.

    Raises:
        RecipeError: bad settings or models that do not fit (one line, with the fix).
        DataError: data the shared model cannot take.
    """
    start = time.perf_counter()
    if keep is None and rank is None:
        keep = DEFAULT_KEEP
    _check_settings(finetuned, data, method, keep, rank, router_steps, router_hidden)
    lam = SHARED_METHODS[method] if lam is None else lam
    opts = options or DataOptions(require_labels=False)
    datasets = [
        d
        if isinstance(d, Dataset)
        else read_data(d, opts, zoo=default_zoo(str(d), zoo), split=split)
        for d in data
    ]
    names = _names(names, datasets)
    # Fail before anything is merged when the data does not fit the model family.
    if head is None and not isinstance(data[0], Dataset):
        head = zoo_head(default_zoo(str(data[0]), zoo), datasets[0].task)
    probe = load_runner(base, head=head, pooling=pooling, max_length=max_length)
    for ds in datasets:
        probe.check(ds)
    text = shared_recipe(method, str(base), [str(m) for m in finetuned], lam, density)
    plan = plan_merge(parse_recipe(text), drop_hint=False)
    files = [Path(d) for d in data if not isinstance(d, Dataset) and Path(d).exists()]
    inputs = [base, *finetuned, *files, *([head] if head is not None else [])]
    warnings: list[str] = []
    try:
        with atomic_output_dir(
            Path(out), force=force, inputs=inputs, overwrite_anything=overwrite_anything
        ) as tmp:
            log(f"shared expert: {method}, λ={lam:g}")
            stats = run_plan(plan, tmp / "shared", threads=threads, strict=_NON_FINITE)
            warnings += stats.warnings
            with open_checkpoint(tmp / "shared") as shared:
                fingerprint = shared.fingerprint()
                shared_bytes = shared.total_bytes
                exclusive_bytes, ft_bytes = {}, 0
                for name, ft in zip(names, finetuned, strict=True):
                    log(f"exclusive part of {name}")
                    nbytes, ft_size = _write_exclusive(
                        shared, ft, tmp / "exclusive" / f"{name}.safetensors",
                        keep=keep, rank=rank, seed=seed, threads=threads,
                    )  # fmt: skip
                    exclusive_bytes[name] = nbytes
                    ft_bytes += ft_size
            log("router")
            router, losses, accuracy, feats = _fit_router(
                tmp / "shared", datasets, head, pooling, max_length,
                steps=router_steps, hidden=router_hidden, seed=seed,
            )  # fmt: skip
            state = router_state(router)
            meta = {"tasks": json.dumps(names), **feats}
            save_statistics(
                state,
                tmp / "router.safetensors",
                kind=ROUTER_KIND,
                model_fingerprint=fingerprint,
                metadata={k: str(v) for k, v in meta.items() if v is not None},
            )
            storage = {
                "shared": shared_bytes,
                "exclusive": sum(exclusive_bytes.values()),
                "router": sum(t.numel() * t.element_size() for t in state.values()),
                "finetuned": ft_bytes,
            }
            storage["total"] = storage["shared"] + storage["exclusive"] + storage["router"]
            manifest = {
                "graft_twin": FORMAT,
                "tasks": names,
                "shared": "shared",
                "exclusive": {t: f"exclusive/{t}.safetensors" for t in names},
                "router": "router.safetensors",
                "routing": "input",
                **feats,
                "merge": text,
                "keep": keep if rank is None else None,
                "rank": rank,
                "base": str(base),
                "finetuned": {t: str(m) for t, m in zip(names, finetuned, strict=True)},
                "data": {t: d.name for t, d in zip(names, datasets, strict=True)},
                "router_training": {
                    "examples": sum(len(d) for d in datasets),
                    "steps": router_steps,
                    "hidden": router.fc1.out_features,
                    "seed": seed,
                    "train_accuracy": accuracy,
                    "final_loss": losses[-1],
                },
                "storage": {**storage, "exclusive_per_task": exclusive_bytes},
            }
            write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    finally:
        plan.close()
    return TwinReport(
        Path(out), names, storage, accuracy, losses, time.perf_counter() - start, warnings
    )


def _check_settings(finetuned, data, method, keep, rank, router_steps, router_hidden) -> None:
    if len(finetuned) < 2:
        raise RecipeError("Twin-Merging needs at least two fine-tuned models, one per task")
    if len(data) != len(finetuned):
        raise RecipeError(
            f"{len(data)} --data for {len(finetuned)} models; give each task's validation "
            "data, one per model in order"
        )
    if method not in SHARED_METHODS:
        raise RecipeError(
            f"unknown shared-expert method {method!r}; valid: {', '.join(SHARED_METHODS)}"
        )
    if (keep is None) == (rank is None):
        raise RecipeError("give exactly one of --keep (a ratio of each matrix's rank) and --rank")
    if keep is not None and not 0 < keep <= 1:
        raise RecipeError(f"--keep must be in (0, 1], got {keep}")
    if rank is not None and rank < 1:
        raise RecipeError(f"--rank must be >= 1, got {rank}")
    if router_steps < 1 or (router_hidden is not None and router_hidden < 1):
        raise RecipeError("--router-steps and --router-hidden must be >= 1")


# The shared expert is the merge of every fine-tune: a NaN in one would poison them all.
_NON_FINITE = "fix the checkpoint (Twin-Merging merges every fine-tune into the shared model)"


def _write_exclusive(
    shared, finetuned, path: Path, *, keep, rank, seed: int, threads: int | None
) -> tuple[int, int]:
    """Write one task's exclusive part as a patch against ``shared``; returns the stored
    payload bytes and the fine-tune's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layout: dict[str, dict] = {}
    lock = threading.Lock()
    with open_checkpoint(finetuned) as ft, SpoolWriter(path) as writer:
        names = [n for n in shared.names if shared.info(n).dtype.is_floating_point]
        for n in names:
            if n not in ft or tuple(ft.info(n).shape) != tuple(shared.info(n).shape):
                raise RecipeError(
                    f"tensor {n} of the shared model is missing from {finetuned} or has "
                    "another shape; every fine-tune must share the base's architecture"
                )

        def work(name: str) -> int:
            tau = ft.get(name).float() - shared.get(name).float()
            if not torch.isfinite(tau).all():
                raise RecipeError(f"tensor {name} of {finetuned} holds NaN or Inf; fix it")
            if not tau.any():
                return 0
            gen = torch.Generator().manual_seed(tensor_seed(seed, name))
            codec, parts = compress_exclusive(
                tau, keep=keep, rank=rank, value_dtype=ft.info(name).dtype, generator=gen
            )
            with lock:
                layout[name] = {"codec": codec, "shape": list(tau.shape)}
            for part, t in parts.items():
                writer.write(codecs.part_name(name, part), t.contiguous())
            return sum(t.numel() * t.element_size() for t in parts.values())

        stats = run_pass(
            names,
            work,
            threads=threads or default_threads(),
            input_bytes=lambda n: shared.info(n).nbytes + ft.info(n).nbytes,
        )
        params = {"keep": keep, "rank": rank, "seed": seed}
        meta = delta_metadata("lowrank", shared, "shared", ft, finetuned, params, layout, "float32")
        meta["graft_twin_exclusive"] = "1"
        writer.finish(meta)
        return stats.bytes_written, ft.total_bytes


def _fit_router(shared: Path, datasets, head, pooling, max_length, *, steps, hidden, seed):
    """Features of every task's data from the shared model, and the router fit to them
    (``head`` only sets the default pooling and token length)."""
    runner = load_runner(shared, head=head, pooling=pooling, max_length=max_length)
    feats, labels = [], []
    for t, ds in enumerate(datasets):
        f = features(runner, ds, batch_size=64)
        feats.append(f)
        labels.append(torch.full((len(f),), t, dtype=torch.long))
    x, y = torch.cat(feats), torch.cat(labels)
    if not torch.isfinite(x).all():
        raise DataError("the shared model's features hold NaN or Inf; check the models")
    router, losses = train_router(x, y, len(datasets), hidden=hidden, steps=steps, seed=seed)
    accuracy = float((router.weights(x).argmax(1) == y).double().mean())
    info = {
        "pooling": runner.pooling if runner.kind == "transformers" else None,
        "max_length": runner.max_length if runner.kind == "transformers" else None,
    }
    return router, losses, accuracy, info
