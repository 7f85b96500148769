"""The MoE outputs graft builds from dense Llama / Mistral / Qwen2 / Qwen3 experts, as data.

Tensor names are the Hub's classic layouts, which every transformers version loads
(transformers 5 converts them to its fused ``experts.gate_up_proj`` on load), as do
llama.cpp and vLLM:

* Mixtral: ``model.layers.L.block_sparse_moe.gate.weight`` (router, ``(experts, hidden)``)
  and ``...block_sparse_moe.experts.E.{w1,w2,w3}.weight`` = the dense MLP's
  ``{gate_proj, down_proj, up_proj}``.
* Qwen2-MoE: ``model.layers.L.mlp.gate.weight``, ``...mlp.experts.E.{gate,up,down}_proj``,
  ``...mlp.shared_expert.{gate,up,down}_proj`` and ``...mlp.shared_expert_gate.weight``
  (``(1, hidden)``). Its attention has q/k/v biases: zeros where the base has none.
* Qwen3-MoE (from Qwen3 experts only, as mergekit): ``model.layers.L.mlp.gate.weight`` and
  ``...mlp.experts.E.{gate,up,down}_proj.weight``; no shared expert. The attention (with
  Qwen3's ``q_norm`` / ``k_norm``) is the base's, unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# A dense decoder layer's MLP, as Llama, Mistral and Qwen2 checkpoints name it.
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
LAYER_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")
ATTN_BIAS = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias$")
RESIDUAL_PROJ = "down_proj"  # the projection writing into the residual stream

# config.json keys of the dense source that have no meaning (or a different one) in the
# MoE config; the MoE model class then uses its own defaults for them.
_DROP = (
    "architectures",
    "model_type",
    "_name_or_path",
    "mlp_bias",
    "attention_bias",
    "pretraining_tp",
    "layer_types",
    "use_sliding_window",
    "max_window_layers",
    "sliding_window",
)


@dataclass(frozen=True)
class MoEArch:
    """One output architecture.

    Attributes:
        name: graft's name of the output (``mixtral``, ``qwen2_moe``, ``qwen3_moe``).
        title: for messages.
        source_types: the dense ``model_type`` values its experts may have.
        expert: output name of expert ``e``'s projection in layer ``l``; takes ``layer``,
            ``expert`` and ``proj`` (the dense name, e.g. ``gate_proj``).
        router: output name of layer ``l``'s router.
        shared: output name of the shared expert's projection (None: no shared expert).
        shared_gate: output name of the shared expert's gate (None: no shared expert).
        shared_count: how many shared experts it takes (mergekit's rule: 0 or exactly 1).
        qkv_bias: the attention has q/k/v biases.
        config: the MoE ``config.json`` from the dense base's.
    """

    name: str
    title: str
    source_types: tuple[str, ...]
    expert: Callable[[int, int, str], str]
    router: Callable[[int], str]
    shared: Callable[[int, str], str] | None
    shared_gate: Callable[[int], str] | None
    qkv_bias: bool
    config: Callable[..., dict]
    shared_count: int = 0


_MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _mixtral_config(base: Mapping, *, num_experts: int, experts_per_token: int, **_) -> dict:
    cfg = {k: v for k, v in base.items() if k not in _DROP}
    cfg.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        sliding_window=None,
    )
    return cfg


def _qwen2_moe_config(base: Mapping, *, num_experts: int, experts_per_token: int, **_) -> dict:
    cfg = {k: v for k, v in base.items() if k not in _DROP}
    inter = base["intermediate_size"]
    cfg.update(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,  # mergekit's choice: top-k weights sum to 1, as in Mixtral
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter,
        qkv_bias=True,
        use_sliding_window=False,
        sliding_window=None,
    )
    return cfg


def _qwen3_moe_config(base: Mapping, *, num_experts: int, experts_per_token: int, **_) -> dict:
    # Qwen3's sliding-window keys carry over (Qwen3MoeConfig has the same ones), as in
    # mergekit's Qwen3MoeConfig(**base_config.to_dict()).
    keep = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
    cfg = {k: v for k, v in base.items() if k not in _DROP or k in keep}
    cfg.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,  # mergekit's choice, as for Qwen2-MoE
        moe_intermediate_size=base["intermediate_size"],
    )
    return cfg


ARCHS = {
    "mixtral": MoEArch(
        name="mixtral",
        title="Mixtral",
        source_types=("llama", "mistral"),
        expert=lambda i, e, p: (
            f"model.layers.{i}.block_sparse_moe.experts.{e}.{_MIXTRAL_W[p]}.weight"
        ),
        router=lambda i: f"model.layers.{i}.block_sparse_moe.gate.weight",
        shared=None,
        shared_gate=None,
        qkv_bias=False,
        config=_mixtral_config,
    ),
    "qwen2_moe": MoEArch(
        name="qwen2_moe",
        title="Qwen2-MoE",
        source_types=("llama", "mistral", "qwen2"),
        expert=lambda i, e, p: f"model.layers.{i}.mlp.experts.{e}.{p}.weight",
        router=lambda i: f"model.layers.{i}.mlp.gate.weight",
        shared=lambda i, p: f"model.layers.{i}.mlp.shared_expert.{p}.weight",
        shared_gate=lambda i: f"model.layers.{i}.mlp.shared_expert_gate.weight",
        qkv_bias=True,
        config=_qwen2_moe_config,
        shared_count=1,
    ),
    "qwen3_moe": MoEArch(
        name="qwen3_moe",
        title="Qwen3-MoE",
        source_types=("qwen3",),
        expert=lambda i, e, p: f"model.layers.{i}.mlp.experts.{e}.{p}.weight",
        router=lambda i: f"model.layers.{i}.mlp.gate.weight",
        shared=None,
        shared_gate=None,
        qkv_bias=False,
        config=_qwen3_moe_config,
    ),
}


def dense_mlp(layer: int, proj: str) -> str:
    """The dense checkpoint's name of layer ``layer``'s MLP projection ``proj``."""
    return f"model.layers.{layer}.mlp.{proj}.weight"


def choose_arch(names: tuple[str, ...], model_type: str | None, shared: int) -> MoEArch:
    """The first of ``names`` (mergekit's order) that takes ``shared`` shared experts of
    dense type ``model_type``, as mergekit-moe picks among the outputs that match.

    Raises:
        ValueError: none does; the message gives each one's reason.
    """
    reasons = []
    for name in names:
        arch = ARCHS[name]
        if arch.shared_count != shared:
            want = "exactly one entry" if arch.shared_count else "no entries"
            reasons.append(f"{arch.title} takes {want} in shared_experts")
        elif model_type not in arch.source_types:
            types = ", ".join(arch.source_types)
            reasons.append(f"{arch.title} takes experts of type {types}")
        else:
            return arch
    raise ValueError(
        f"no MoE output of architecture {'/'.join(names)} takes these {model_type!r} models: "
        + "; ".join(reasons)
    )
