"""The built-in demo: a tiny Llama-shaped family made on the spot, merged by every method.

Until the real-data zoo lands, this shows the whole merge path (recipe -> plan -> stream
-> atomic model folder) on models generated from a seed, and a data-free measure of what
each method keeps of each fine-tune: the cosine between the merged delta and each task's
delta, over all float tensors.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from graft.io import load_state_dict, save_state_dict
from graft.merge import METHODS
from graft.plan import plan_merge, run_plan
from graft.recipe import parse_recipe

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# Parameters each method gets in the demo (per-model ones go on every fine-tune).
DEMO_PARAMS: dict[str, tuple[dict, dict]] = {
    # method: (global parameters, per-model parameters)
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({"lambda": 0.5}, {"weight": 1.0}),
    "ties": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.3}),
    "dare_linear": ({"lambda": 0.5}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs": ({"lambda": 0.5}, {"weight": 1.0, "density": 0.5, "gamma": 0.01}),
    "breadcrumbs_ties": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.5, "gamma": 0.01}),
    "della": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "della_linear": ({"lambda": 0.5}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "model_stock": ({}, {}),
    "nuslerp": ({}, {"weight": 1.0}),
    "multislerp": ({}, {"weight": 1.0}),
    "lines": ({"alpha": 0.5, "beta": 0.5}, {"weight": 1.0}),
    "slerp": ({"t": 0.5}, {}),
}


@dataclass
class DemoRow:
    method: str
    seconds: float
    cosines: list[float]


def make_family(root: Path, *, seed: int = 0, tasks: int = 3) -> tuple[Path, list[Path]]:
    """Write a base and ``tasks`` fine-tunes (base + low-rank + sparse task deltas).

    Deterministic from ``seed``; a family already complete in ``root`` is reused.
    """
    base_dir = root / "base"
    fts = [root / f"task{k}" for k in range(tasks)]
    stamp = root / f"complete-seed{seed}"
    if stamp.exists():
        return base_dir, fts
    if root.exists():
        shutil.rmtree(root)
    gen = torch.Generator().manual_seed(seed)
    cfg = TINY_LLAMA
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    base = {
        n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.05)
        for n, s in shapes.items()
    }
    save_state_dict(base, base_dir, config=cfg)
    for k in range(tasks):
        ft = {}
        for n, w in base.items():
            if w.ndim == 2:  # a low-rank update plus a few large sparse entries
                a = torch.randn(w.shape[0], 2, generator=gen)
                b = torch.randn(2, w.shape[1], generator=gen)
                sparse = torch.randn(w.shape, generator=gen) * (torch.rand(w.shape, generator=gen) < 0.02)
                ft[n] = w + 0.01 * (a @ b) / 2 + 0.02 * sparse
            else:
                ft[n] = w + 0.01 * torch.randn(w.shape, generator=gen)
        save_state_dict(ft, fts[k], config=cfg)
    stamp.touch()
    return base_dir, fts


def inputs_for(method: str, fts: list[Path]) -> list[Path]:
    """The fine-tunes a method takes in the demo (SLERP: one; NuSLERP: two; others: all)."""
    most = METHODS[method].max_models
    return fts[:most] if most else fts


def recipe_for(method: str, base: Path, fts: list[Path]) -> str:
    """The YAML recipe the demo runs for one method."""
    shared, per_model = DEMO_PARAMS[method]
    doc: dict = {"merge_method": method}
    if METHODS[method].base != "none":
        doc["base_model"] = str(base)
    doc["models"] = [
        {"model": str(p), "parameters": dict(per_model)} if per_model else {"model": str(p)}
        for p in inputs_for(method, fts)
    ]
    if shared:
        doc["parameters"] = shared
    return yaml.safe_dump(doc, sort_keys=False)


def _cosines(merged: dict, base: dict, fts: list[dict]) -> list[float]:
    out = []
    for ft in fts:
        dot = m2 = t2 = 0.0
        for n, b in base.items():
            if not b.is_floating_point():
                continue
            dm, dt = (merged[n].float() - b).flatten(), (ft[n] - b).flatten()
            dot += float(dm @ dt)
            m2 += float(dm @ dm)
            t2 += float(dt @ dt)
        out.append(dot / max((m2 * t2) ** 0.5, 1e-12))
    return out


def run_demo(
    workdir: Path, *, threads: int = 2, log: Callable[[str], None] = print
) -> list[DemoRow]:
    """Build the family in ``workdir`` and merge it with every registered method."""
    workdir.mkdir(parents=True, exist_ok=True)
    base_path, ft_paths = make_family(workdir / "models")
    base = load_state_dict(base_path)
    fts = [load_state_dict(p) for p in ft_paths]
    rows = []
    for method in METHODS:
        if method not in DEMO_PARAMS:
            if method != "passthrough":  # passthrough only copies; it is for slices
                log(f"(demo has no settings for {method}; skipped)")
            continue
        text = recipe_for(method, base_path, ft_paths)
        out = workdir / "merged" / method
        plan = plan_merge(parse_recipe(text))
        start = time.perf_counter()
        try:
            run_plan(plan, out, threads=threads, force=True)
        finally:
            plan.close()
        seconds = time.perf_counter() - start
        merged = load_state_dict(out)
        used = fts[: len(inputs_for(method, ft_paths))]
        rows.append(DemoRow(method, seconds, _cosines(merged, base, used)))
    return rows
