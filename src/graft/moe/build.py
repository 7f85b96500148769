"""Plan and write a MoE model from dense experts (mergekit-moe's job), streaming.

`plan_moe` opens every model's headers and plans each output tensor; nothing is read
then, so ``graft moe --dry-run`` checks a recipe in milliseconds. `compute_gates` builds
the routers (`graft.moe.gates`), running the base model on the prompts when the gate mode
asks for it. `run_moe` then streams: each output tensor is one tensor read from one model
(or a router row block), cast and written at its offset, a few at a time through the
shared pass (`graft.plan.run_pass`), so memory stays near a few tensors, never a model.

What comes from where (mergekit's semantics): every tensor outside the decoder layers'
MLPs from ``base_model``; expert ``e``'s MLP in every layer from its ``source_model``
(with ``residual_scale`` multiplying its ``down_proj`` and ``noise_scale`` adding
``N(0, noise_scale^2)`` noise to all three); the routers from `compute_gates`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft import __version__
from graft.io import (
    Checkpoint,
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    recipe_hash,
    write_model_card,
)
from graft.moe import gates as G
from graft.moe.arch import (
    ATTN_BIAS,
    LAYER_MLP,
    MLP_PROJS,
    RESIDUAL_PROJ,
    MoEArch,
    choose_arch,
    dense_mlp,
)
from graft.plan import PlanError, RunStats, Source, default_threads, run_pass, tensor_seed
from graft.plan.models import open_models
from graft.plan.plan import DTYPES
from graft.recipe import ModelRef
from graft.recipe.moe import RANDOM_MODES, Expert, MoERecipe

EMBED = "model.embed_tokens.weight"
Tick = Callable[[int], None]


@dataclass(frozen=True)
class MoEJob:
    """One output tensor. ``kind``: ``copy`` (a base tensor), ``expert`` (an expert's MLP
    projection), ``router`` / ``shared_gate`` (gate rows of ``layer``), ``zeros``."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str
    source: Source | None = None
    layer: int | None = None
    expert: Expert | None = None
    residual: bool = False


@dataclass
class MoEPlan:
    """The planned MoE: opened checkpoints, jobs in output order, the output config."""

    recipe: MoERecipe
    arch: MoEArch
    checkpoints: dict[ModelRef, Checkpoint]
    jobs: list[MoEJob]
    config: dict
    num_layers: int
    hidden_size: int
    gate_dtype: torch.dtype
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def base(self) -> Checkpoint:
        return self.checkpoints[self.recipe.base_model]

    def input_paths(self) -> list[Path]:
        """Every folder or file the build reads (models and LoRA adapters)."""
        paths = []
        for ckpt in self.checkpoints.values():
            paths.append(Path(ckpt.path))
            adapter = getattr(ckpt, "adapter", None)
            if adapter is not None:
                paths.append(Path(adapter.path))
        return paths

    def input_bytes(self, job: MoEJob) -> int:
        if job.source is None:
            return 0
        return self.checkpoints[job.source.model].info(job.source.name).nbytes

    def output_bytes(self) -> int:
        return sum(math.prod(j.shape) * j.out_dtype.itemsize for j in self.jobs)

    def close(self) -> None:
        for ckpt in self.checkpoints.values():
            ckpt.close()


@dataclass
class Gates:
    """Router rows: ``router`` ``(layers, experts, hidden)``; ``shared`` ``(layers, shared
    experts, hidden)`` or None; ``warnings`` about them."""

    router: torch.Tensor
    shared: torch.Tensor | None
    warnings: list[str] = field(default_factory=list)


# --- planning --------------------------------------------------------------------------


def plan_moe(recipe: MoERecipe, *, seed: int | None = None) -> MoEPlan:
    """Open the recipe's models (headers only) and plan every output tensor.

    Args:
        recipe: the parsed recipe.
        seed: for random gates and ``noise_scale``; default the recipe's, else 0.

    Raises:
        PlanError: the models do not fit together or the architecture (names the model
            and tensor).
    """
    ckpts = open_models(recipe.referenced_models(), recipe.root)
    try:
        return _plan(recipe, ckpts, seed if seed is not None else recipe.seed or 0)
    except BaseException:
        for c in ckpts.values():
            c.close()
        raise


def _plan(r: MoERecipe, ckpts: dict[ModelRef, Checkpoint], seed: int) -> MoEPlan:
    base = ckpts[r.base_model]
    model_type = (base.config or {}).get("model_type")
    if not isinstance(model_type, str):
        raise PlanError(
            f"base_model {r.base_model} has no config.json with a model_type; the MoE's "
            "config is built from it: give the base model's folder"
        )
    try:
        arch = choose_arch(r.architectures, model_type, len(r.shared_experts))
    except ValueError as e:
        raise PlanError(f"base_model {r.base_model}: {e}") from None
    cfg = _check_configs(r, arch, ckpts)
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    ref = {p: base.info(dense_mlp(0, p)) for p in MLP_PROJS if dense_mlp(0, p) in base}
    if len(ref) != len(MLP_PROJS):
        raise PlanError(
            f"base_model {r.base_model}: no {dense_mlp(0, 'gate_proj')} (with up_proj, "
            "down_proj); graft builds MoEs from Llama / Mistral / Qwen2-style dense models"
        )
    dtype_name = r.dtype or _config_dtype(cfg)
    out_dtype = DTYPES[dtype_name] if dtype_name else None

    def dt(stored: torch.dtype) -> torch.dtype:
        return out_dtype if out_dtype is not None and stored.is_floating_point else stored

    groups = [("experts", r.experts), ("shared_experts", r.shared_experts)]
    for where, group in groups:
        for i, e in enumerate(group):
            _check_expert(f"{where}[{i}]", e, ckpts[e.model], layers, ref)
    gate_dtype = dt(ref["gate_proj"].dtype)
    jobs: list[MoEJob] = []
    done_layers: set[int] = set()
    for name in base.names:
        m = LAYER_MLP.match(name)
        if m is not None and int(m.group(1)) < layers:
            layer = int(m.group(1))
            if layer not in done_layers:
                done_layers.add(layer)
                jobs += _layer_jobs(r, arch, layer, ref, hidden, dt, gate_dtype)
            continue
        _check_base_tensor(r, arch, name)
        info = base.info(name)
        jobs.append(
            MoEJob(name, tuple(info.shape), dt(info.dtype), "copy", Source(r.base_model, name))
        )
        bias = arch.qkv_bias and _missing_qkv_bias(name, base)
        if bias:
            jobs.append(MoEJob(bias, (info.shape[0],), dt(info.dtype), "zeros"))
    missing = sorted(set(range(layers)) - done_layers)
    if missing:
        raise PlanError(f"base_model {r.base_model}: layer {missing[0]} has no MLP tensors")
    config = arch.config(cfg, num_experts=len(r.experts), experts_per_token=r.experts_per_token)
    if dtype_name:
        config["torch_dtype"] = dtype_name
        if "dtype" in config:  # transformers >= 4.56 writes "dtype"
            config["dtype"] = dtype_name
    notes = []
    if len(r.experts) & (len(r.experts) - 1):
        notes.append(f"{len(r.experts)} experts is not a power of two; llama.cpp cannot run it")
    return MoEPlan(r, arch, ckpts, jobs, config, layers, hidden, gate_dtype, seed, notes)


def _check_configs(r: MoERecipe, arch: MoEArch, ckpts: dict[ModelRef, Checkpoint]) -> dict:
    base_cfg = None
    for ref in r.referenced_models():
        cfg = ckpts[ref].config
        what = "base_model" if ref == r.base_model else f"expert model {ref}"
        if cfg is None:
            raise PlanError(f"{what}: no config.json next to the weights; give a model folder")
        kind = cfg.get("model_type")
        if kind not in arch.source_types:
            raise PlanError(
                f"{what} is a {kind!r} model; {arch.title} output takes experts of type "
                f"{', '.join(arch.source_types)}"
            )
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise PlanError(f"{what}: config.json has no {key}")
        if base_cfg is None:
            base_cfg = cfg
            continue
        for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size"):
            if cfg.get(key) != base_cfg.get(key):
                raise PlanError(
                    f"{what} has {key} {cfg.get(key)!r}, base_model {r.base_model} has "
                    f"{base_cfg.get(key)!r}; every expert must share the base's architecture"
                )
    if base_cfg.get("mlp_bias"):
        raise PlanError(f"base_model {r.base_model} has MLP biases; {arch.title} experts have none")
    return base_cfg


def _config_dtype(cfg: dict) -> str | None:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in DTYPES else None


def _check_expert(where: str, e: Expert, ckpt: Checkpoint, layers: int, ref: dict) -> None:
    for name in ckpt.names:
        m = LAYER_MLP.match(name)
        if m is not None and m.group(2) not in {f"{p}.weight" for p in MLP_PROJS}:
            raise PlanError(
                f"{where} ({e.model}) has {name}; graft's MoE experts are gate/up/down "
                "projections without biases"
            )
    for layer in range(layers):
        for proj in MLP_PROJS:
            name = dense_mlp(layer, proj)
            if name not in ckpt:
                raise PlanError(f"{where} ({e.model}) has no tensor {name}")
            info = ckpt.info(name)
            if tuple(info.shape) != tuple(ref[proj].shape) or not info.dtype.is_floating_point:
                raise PlanError(
                    f"{where} ({e.model}): {name} is {str(info.dtype).replace('torch.', '')} "
                    f"{tuple(info.shape)}, the base's is {tuple(ref[proj].shape)}; experts must "
                    "have the base's MLP shapes"
                )


def _check_base_tensor(r: MoERecipe, arch: MoEArch, name: str) -> None:
    m = ATTN_BIAS.match(name)
    if m is not None and (not arch.qkv_bias or m.group(2) == "o"):
        raise PlanError(
            f"base_model {r.base_model} has {name}; {arch.title} attention has no such bias"
        )


def _missing_qkv_bias(name: str, base: Checkpoint) -> str | None:
    for p in "qkv":
        if name.endswith(f".self_attn.{p}_proj.weight"):
            bias = name[: -len("weight")] + "bias"
            return None if bias in base else bias
    return None


def _layer_jobs(r, arch: MoEArch, layer: int, ref: dict, hidden: int, dt, gate_dtype):
    jobs = [MoEJob(arch.router(layer), (len(r.experts), hidden), gate_dtype, "router", layer=layer)]
    for e_idx, e in enumerate(r.experts):
        for proj in MLP_PROJS:
            src = Source(e.model, dense_mlp(layer, proj))
            shape, dtype = tuple(ref[proj].shape), dt(ref[proj].dtype)
            name = arch.expert(layer, e_idx, proj)
            jobs.append(MoEJob(name, shape, dtype, "expert", src, layer, e, proj == RESIDUAL_PROJ))
    for e in r.shared_experts:
        for proj in MLP_PROJS:
            src = Source(e.model, dense_mlp(layer, proj))
            shape, dtype = tuple(ref[proj].shape), dt(ref[proj].dtype)
            name = arch.shared(layer, proj)
            jobs.append(MoEJob(name, shape, dtype, "expert", src, layer, e, proj == RESIDUAL_PROJ))
        jobs.append(
            MoEJob(arch.shared_gate(layer), (1, hidden), gate_dtype, "shared_gate", layer=layer)
        )
    return jobs


# --- gates -----------------------------------------------------------------------------


def compute_gates(plan: MoEPlan, *, device: str = "cpu", progress: Tick | None = None) -> Gates:
    """The router rows for `plan`'s recipe (`graft.moe.gates` states the conventions).

    Args:
        plan: from `plan_moe`.
        device: where the base model runs for the ``hidden`` modes.
        progress: called with 1 after each prompt run through the base model.

    Raises:
        DataError: the base has no tokenizer, or a prompt gives no tokens.
    """
    from graft.moe import prompts as P

    r = plan.recipe
    n_routed = len(r.experts)
    everyone = [(f"experts[{i}]", e) for i, e in enumerate(r.experts)]
    everyone += [(f"shared_experts[{i}]", e) for i, e in enumerate(r.shared_experts)]
    if r.gate_mode in RANDOM_MODES:
        gen = torch.Generator().manual_seed(plan.seed)
        rows = G.random_gates(
            plan.num_layers,
            len(everyone),
            plan.hidden_size,
            uniform=r.gate_mode == "uniform_random",
            generator=gen,
        )
    else:
        root = plan.base.root or Path(plan.base.path)
        prompts = P.expert_prompts(everyone, P.load_tokenizer(root))
        if r.gate_mode == "cheap_embed":
            if EMBED not in plan.base:
                raise PlanError(f"base_model {r.base_model} has no {EMBED} for cheap_embed")
            rows = P.cheap_embed_gates(plan.base.get(EMBED), prompts, plan.num_layers)
        else:
            from graft.plan import resolve_device

            run = P.HiddenStates(root, device=resolve_device(device))
            tick = progress or (lambda n: None)
            rows = P.hidden_gates(run, prompts, average=r.gate_mode == "hidden_avg", tick=tick)
    warnings = []
    bad = G.degenerate_layers(rows)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        warnings.append(
            f"layers {shown} have near-parallel gate rows (condition number > 5): the prompts "
            "of some experts are too alike, so those experts will get few tokens"
        )
    shared = rows[:, n_routed:] if r.shared_experts else None
    return Gates(rows[:, :n_routed].contiguous(), shared, warnings)


def prompt_count(recipe: MoERecipe) -> int:
    """Prompts the base model runs on (0 unless a ``hidden`` mode)."""
    if not recipe.gate_mode.startswith("hidden"):
        return 0
    group = recipe.experts + recipe.shared_experts
    return sum(len(e.positive_prompts) + len(e.negative_prompts) for e in group)


# --- writing ---------------------------------------------------------------------------


def run_moe(
    plan: MoEPlan,
    gates: Gates,
    out: str | Path,
    *,
    threads: int | None = None,
    max_shard_bytes: int = 5_000_000_000,
    force: bool = False,
    overwrite_anything: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RunStats:
    """Write the planned MoE into the model folder ``out`` (atomically), streaming.

    Args:
        plan: from `plan_moe`.
        gates: from `compute_gates`.
        out: the output folder; must not exist unless ``force``.
        threads: tensors in flight (default: cores, at most 4).
        max_shard_bytes: shard size limit of the output safetensors files.
        force / overwrite_anything: as `graft.io.atomic_output_dir`.
        progress: called after each tensor with (1, bytes read + written).
    """
    metadata = {
        "graft_version": __version__,
        "graft_recipe_sha256": recipe_hash(plan.recipe.text),
        "graft_method": f"moe-{plan.arch.name}",
    }
    entries = [(j.name, j.out_dtype, j.shape) for j in plan.jobs]
    start = time.perf_counter()
    warnings = list(gates.warnings)
    with atomic_output_dir(
        Path(out), force=force, inputs=plan.input_paths(), overwrite_anything=overwrite_anything
    ) as tmp:
        with ShardedWriter(tmp, entries, max_shard_bytes=max_shard_bytes, metadata=metadata) as w:
            work = _Worker(plan, gates, w)
            stats = run_pass(
                plan.jobs,
                work,
                threads=threads or default_threads(),
                input_bytes=plan.input_bytes,
                progress=progress,
            )
            w.finish()
        stats.shards = len(w.files)
        base = plan.base
        copy_sidecar_files(base.root, tmp, config=plan.config, warn=warnings.append)
        write_model_card(
            tmp,
            base_models=[str(m) for m in plan.recipe.referenced_models()],
            relation="merge",
            tags=("graft", "moe", plan.arch.name),
            recipe_yaml=plan.recipe.text,
            title=f"graft {plan.arch.title} MoE of {len(plan.recipe.experts)} experts",
        )
    stats.seconds = time.perf_counter() - start
    stats.warnings = warnings
    return stats


class _Worker:
    """Produces and writes one job; safe to call from several threads."""

    def __init__(self, plan: MoEPlan, gates: Gates, writer: ShardedWriter):
        self.plan, self.gates, self.writer = plan, gates, writer

    def __call__(self, job: MoEJob) -> int:
        t = self._tensor(job).to(job.out_dtype).contiguous()
        self.writer.write(job.name, t)
        return t.numel() * t.element_size()

    def _tensor(self, job: MoEJob) -> torch.Tensor:
        if job.kind == "zeros":
            return torch.zeros(job.shape)
        if job.kind == "router":
            return self.gates.router[job.layer]
        if job.kind == "shared_gate":
            return self.gates.shared[job.layer]
        t = self.plan.checkpoints[job.source.model].get(job.source.name)
        e = job.expert
        if job.kind != "expert" or (e.noise_scale is None and not job.residual):
            return t
        t = t.float()
        if e.noise_scale is not None:
            gen = torch.Generator().manual_seed(tensor_seed(self.plan.seed, job.name))
            t = t + torch.randn(t.shape, generator=gen) * e.noise_scale
        if job.residual and e.residual_scale is not None:
            t = t * e.residual_scale
        return t
