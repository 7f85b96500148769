"""mergekit-moe recipes (``mergekit-moe config.yaml out``) as frozen dataclasses.

Keys, as mergekit's ``MoEMergeConfig``: ``base_model``, ``experts`` (each
``source_model``, ``positive_prompts``, ``negative_prompts``, ``noise_scale``,
``residual_scale``), ``gate_mode`` (default ``hidden``), ``dtype``, ``experts_per_token``
(default 2), ``shared_experts`` and ``architecture``. graft adds ``seed`` (random gates and
noise; ``--seed`` overrides). Unlike mergekit, which ignores unknown keys, graft refuses
them, so a typo (``postive_prompts``) cannot silently give a random router.

The checks mergekit runs before merging (``is_bad_config``) run here too, before any file
is opened: at least ``experts_per_token`` experts, prompts for every expert unless the
gates are random, prompts that differ between experts, and experts that are not all the
same model unless the caller allows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.io._readers import load_yaml
from graft.recipe._settings import RecipeError, show
from graft.recipe.config import (
    DTYPE_ALIASES,
    DTYPES,
    MAX_RECIPE_NODES,
    MAX_SEED,
    ModelRef,
    read_recipe_text,
)

TOP_KEYS = (
    "base_model",
    "experts",
    "shared_experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "architecture",
    "seed",
)
EXPERT_KEYS = (
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
)
# mergekit's modes: "hidden" and "hidden_last" take each prompt's last token, "hidden_avg"
# its mean over tokens; "cheap_embed" the prompts' token embeddings; "random" N(0, 1);
# "uniform_random" U(-1/sqrt(h), 1/sqrt(h)), torch.nn.Linear's initialisation.
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_MODES = ("random", "uniform_random")
# `architecture:` is matched as mergekit does, as a prefix of its outputs' names, in its
# order; of several matches (``qwen``, or none given) the first that takes the models wins
# (`graft.moe.build`). How many shared experts each output takes, as mergekit's.
ARCHITECTURES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe", "qwen3 moe": "qwen3_moe"}
SHARED_EXPERTS = {"mixtral": 0, "qwen2_moe": 1, "qwen3_moe": 0}
TITLES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}
# mergekit-moe's DeepSeek output is DeepSeek-MoE v1 as remote code from the Hub
# (auto_map to deepseek-ai/deepseek-moe-16b-base); transformers has no such class and
# graft never downloads, so it could not load what graft wrote.
UNSUPPORTED_ARCHITECTURES = ("deepseek",)
MAX_EXPERTS = 1024
MAX_PROMPTS = 10_000


@dataclass(frozen=True)
class Expert:
    """One expert: the model whose MLPs it takes and the prompts that route to it."""

    model: ModelRef
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoERecipe:
    """A validated mergekit-moe recipe.

    Attributes:
        architectures: the outputs ``architecture:`` names (a prefix of their names; all
            when not given), in mergekit's order (``mixtral``, ``qwen2_moe``, ``qwen3_moe``);
            planning picks the first whose expert types fit the models, as mergekit does
            (so no ``architecture:`` gives Mixtral for Llama experts, Qwen2-MoE with one
            shared expert, Qwen3-MoE for Qwen3 experts).
        text: the YAML as given, for the model card.
        root: folder of the recipe file, where relative model paths are also looked up.
    """

    base_model: ModelRef
    experts: tuple[Expert, ...]
    shared_experts: tuple[Expert, ...]
    gate_mode: str
    dtype: str | None
    experts_per_token: int
    architectures: tuple[str, ...]
    seed: int | None
    text: str
    root: Path | None = None

    def referenced_models(self) -> list[ModelRef]:
        """The base, then every expert's model, each once."""
        refs = [self.base_model, *(e.model for e in self.experts + self.shared_experts)]
        return list(dict.fromkeys(refs))


def load_moe_recipe(path: str | Path, *, allow_same_experts: bool = False) -> MoERecipe:
    """Read and validate a mergekit-moe recipe file (UTF-8 YAML).

    Args:
        path: the recipe file.
        allow_same_experts: accept experts that are all the same model (mergekit's
            ``--i-understand-this-is-not-useful-without-training``).

    Raises:
        RecipeError: the recipe is not valid; the message names the key.
    """
    p = Path(path)
    text = read_recipe_text(p)
    return parse_moe_recipe(text, root=p.resolve().parent, allow_same_experts=allow_same_experts)


def parse_moe_recipe(
    text: str, *, root: Path | None = None, allow_same_experts: bool = False
) -> MoERecipe:
    """Parse mergekit-moe YAML text into a validated `MoERecipe` (see `load_moe_recipe`)."""
    try:
        raw = load_yaml(text, max_nodes=MAX_RECIPE_NODES)
    except ValueError as exc:
        raise RecipeError(f"recipe is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError("a MoE recipe must be a YAML mapping with base_model and experts")
    if "merge_method" in raw:
        raise RecipeError("recipe has merge_method: it is a merge recipe; run graft merge")
    for key in raw:
        if key not in TOP_KEYS:
            raise RecipeError(
                f"unknown MoE recipe key {show(key)}; valid keys: {', '.join(TOP_KEYS)}"
            )
    if not raw.get("base_model"):
        raise RecipeError("base_model: required (the model attention and embeddings come from)")
    base = ModelRef.parse(raw["base_model"], "base_model")
    if base.adapter:
        raise RecipeError(
            "base_model: adapters are not supported here; merge it first (graft merge-lora)"
        )
    gate_mode = raw.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise RecipeError(
            f"gate_mode: unknown mode {show(gate_mode)}; valid: {', '.join(GATE_MODES)}"
        )
    experts = _parse_experts(raw.get("experts"), "experts", required=True)
    shared = _parse_experts(raw.get("shared_experts"), "shared_experts", required=False)
    recipe = MoERecipe(
        base_model=base,
        experts=experts,
        shared_experts=shared,
        gate_mode=gate_mode,
        dtype=_parse_dtype(raw.get("dtype")),
        experts_per_token=_parse_count(raw.get("experts_per_token", 2), "experts_per_token"),
        architectures=_parse_architecture(raw.get("architecture"), shared),
        seed=_parse_seed(raw.get("seed")),
        text=text,
        root=root,
    )
    _check(recipe, allow_same_experts)
    return recipe


def _parse_experts(raw: Any, where: str, *, required: bool) -> tuple[Expert, ...]:
    if raw is None and not required:
        return ()
    if not isinstance(raw, list) or (required and not raw):
        raise RecipeError(
            f"{where}: must be a non-empty list of {{source_model: PATH, positive_prompts: [...]}}"
        )
    if len(raw) > MAX_EXPERTS:
        raise RecipeError(f"{where}: {len(raw)} experts; graft takes at most {MAX_EXPERTS}")
    out = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or "source_model" not in entry:
            raise RecipeError(f"{at}: each expert needs 'source_model: PATH'")
        for key in entry:
            if key not in EXPERT_KEYS:
                raise RecipeError(
                    f"{at}: unknown key {show(key)}; valid keys: {', '.join(EXPERT_KEYS)}"
                )
        out.append(
            Expert(
                model=ModelRef.parse(entry["source_model"], f"{at}.source_model"),
                positive_prompts=_parse_prompts(
                    entry.get("positive_prompts"), f"{at}.positive_prompts"
                ),
                negative_prompts=_parse_prompts(
                    entry.get("negative_prompts"), f"{at}.negative_prompts"
                ),
                noise_scale=_parse_scale(entry.get("noise_scale"), f"{at}.noise_scale"),
                residual_scale=_parse_scale(entry.get("residual_scale"), f"{at}.residual_scale"),
            )
        )
    return tuple(out)


def _parse_prompts(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise RecipeError(f"{where}: must be a list of strings, got {show(raw)}")
    if len(raw) > MAX_PROMPTS:
        raise RecipeError(f"{where}: {len(raw)} prompts; graft takes at most {MAX_PROMPTS}")
    return tuple(raw)


def _parse_scale(raw: Any, where: str) -> float | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, int | float)
        or isinstance(raw, bool)
        or not math.isfinite(raw)
        or abs(raw) > 1e6
    ):
        raise RecipeError(f"{where}: must be a finite number, got {show(raw)}")
    return float(raw)


def _parse_count(raw: Any, where: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= MAX_EXPERTS:
        raise RecipeError(
            f"{where}: must be a whole number from 1 to {MAX_EXPERTS}, got {show(raw)}"
        )
    return raw


def _parse_dtype(raw: Any) -> str | None:
    if raw is None:
        return None
    name = DTYPE_ALIASES.get(raw, raw) if isinstance(raw, str) else raw
    if name not in DTYPES:
        raise RecipeError(f"dtype: unknown dtype {show(raw)}; valid: {', '.join(DTYPES)}")
    return name


def _parse_seed(raw: Any) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or abs(raw) > MAX_SEED:
        raise RecipeError(f"seed: must be an integer of at most 2**63 - 1, got {show(raw)}")
    return raw


def _parse_architecture(raw: Any, shared: tuple[Expert, ...]) -> tuple[str, ...]:
    valid = "mixtral, qwen (Qwen2-MoE, Qwen3-MoE), qwen3"
    if raw is None:
        matches = list(ARCHITECTURES.values())
    elif not isinstance(raw, str) or not raw.strip():
        raise RecipeError(f"architecture: must be a name ({valid}), got {show(raw)}")
    else:
        name = raw.strip().lower()
        if name.startswith(UNSUPPORTED_ARCHITECTURES):
            raise RecipeError(
                f"architecture: {show(raw)}: mergekit's DeepSeek output is remote code that "
                f"transformers cannot load offline, so graft does not build it; use {valid}"
            )
        matches = [arch for full, arch in ARCHITECTURES.items() if full.startswith(name)]
        if not matches:
            raise RecipeError(f"architecture: unknown output {show(raw)}; valid: {valid}")
    if any(SHARED_EXPERTS[a] == len(shared) for a in matches):
        return tuple(matches)
    if "qwen2_moe" in matches:
        raise RecipeError("shared_experts: Qwen2-MoE output needs exactly one shared expert")
    raise RecipeError(
        f"shared_experts: {TITLES[matches[0]]} has no shared experts; remove them or use "
        "architecture: qwen"
    )


def _check(r: MoERecipe, allow_same_experts: bool) -> None:
    if len(r.experts) < r.experts_per_token:
        raise RecipeError(
            f"experts_per_token: {r.experts_per_token} but only {len(r.experts)} experts; "
            "list at least as many experts as experts_per_token"
        )
    if r.gate_mode in RANDOM_MODES:
        return
    for where, group in (("experts", r.experts), ("shared_experts", r.shared_experts)):
        for i, e in enumerate(group):
            if not e.positive_prompts:
                raise RecipeError(
                    f"{where}[{i}].positive_prompts: required with gate_mode {r.gate_mode} "
                    "(prompts that should be routed to this expert); or use gate_mode: random"
                )
    prompts = {(e.positive_prompts, e.negative_prompts) for e in r.experts}
    if len(r.experts) > 1 and len(prompts) == 1:
        raise RecipeError(
            "experts: every expert has the same positive and negative prompts, so the router "
            "cannot tell them apart; give each expert prompts of what should go to it"
        )
    if len(r.experts) > 1 and len({e.model for e in r.experts}) == 1 and not allow_same_experts:
        raise RecipeError(
            "experts: all experts are the same model, which gives the same outputs at more "
            "cost; pass --i-understand-this-is-not-useful-without-training to build it anyway"
        )
