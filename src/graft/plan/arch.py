"""Architecture knowledge as data: where the repeated blocks are and how they are counted.

Tensor names of Hugging Face models put the block index after a known container name
(``model.layers.7.``, ``transformer.h.7.``, ``encoder.layer.7.``). Everything else is
outside the blocks: *pre* tensors (embeddings) come before them, *post* tensors (final
norm, head, pooler) after. Depth up-scaling takes pre tensors from the first slice's
models and post tensors from the last slice's, as mergekit does.

A model can hold several *stacks* of blocks, numbered separately and often of different
depths: T5's ``encoder.block.N`` and ``decoder.block.N``, CLIP's
``text_model.encoder.layers.N`` and ``vision_model.encoder.layers.N``, a LLaVA-style
model's language model and vision tower. A block's stack is the part of its name before
the index (`BlockName.prefix`), the general rule mergekit's inferred architectures use
too; `stack_depths` counts each stack, from the config key `STACK_DEPTH_KEYS` names for
it when the config has one, else from the tensor names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Containers whose numbered children are the residual blocks. Order does not matter: a
# name matches at most one of them in the architectures we know.
BLOCK_CONTAINERS = (
    "layers",  # Llama, Mistral, Qwen, Gemma, Phi, OPT (decoder.layers), GPT-NeoX
    "h",  # GPT-2, GPT-J, Falcon, BLOOM
    "layer",  # BERT, RoBERTa, MiniLM (encoder.layer)
    "blocks",  # MPT, ViT-style zoo models
    "block",  # T5
)
_BLOCK_RE = re.compile(r"(^|\.)(" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)\.")

# Tensors outside the blocks that come *before* them.
_PRE_MARKERS = ("embed", "wte", "wpe", "embeddings", "tok_embeddings", "word_embeddings")

# config.json keys that hold the block count, by model family.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class BlockName:
    """A tensor name split around its block index: ``prefix{index}suffix``."""

    prefix: str
    index: int
    suffix: str

    def renumber(self, index: int) -> str:
        return f"{self.prefix}{index}{self.suffix}"


def split_block_name(name: str) -> BlockName | None:
    """The block index of a tensor name, or None for tensors outside the blocks."""
    m = _BLOCK_RE.search(name)
    if m is None:
        return None
    start, end = m.start(3), m.end(3)
    return BlockName(name[:start], int(m.group(3)), name[end:])


# config.json keys holding the depth of one stack of a multi-stack model, by the end of
# the stack's prefix (the longest matching entry wins); dotted keys look into sub-configs.
# A stack listed nowhere is counted from its tensor names (highest index + 1).
STACK_DEPTH_KEYS: dict[str, str] = {
    "encoder.block.": "num_layers",  # T5, mT5, Flan-T5
    "decoder.block.": "num_decoder_layers",  # T5
    "encoder.layers.": "encoder_layers",  # BART, Marian, Whisper (model.encoder.layers.)
    "decoder.layers.": "decoder_layers",  # BART, Marian, Whisper
    "text_model.encoder.layers.": "text_config.num_hidden_layers",  # CLIP, SigLIP
    "vision_model.encoder.layers.": "vision_config.num_hidden_layers",  # CLIP, SigLIP, LLaVA
    "vision_tower.encoder.layers.": "vision_config.num_hidden_layers",  # LLaVA, transformers 5
    "language_model.model.layers.": "text_config.num_hidden_layers",  # LLaVA, transformers 4
    "language_model.layers.": "text_config.num_hidden_layers",  # LLaVA, transformers 5
}


def stack_depth_key(prefix: str) -> str | None:
    """The config key that holds the depth of the stack ``prefix``, if one is known."""
    ends = [end for end in STACK_DEPTH_KEYS if prefix == end or prefix.endswith("." + end)]
    return STACK_DEPTH_KEYS[max(ends, key=len)] if ends else None


def _config_value(config: Mapping | None, key: str) -> int | None:
    value: object = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _config_count(config: Mapping | None) -> int | None:
    for key in LAYER_COUNT_KEYS:
        if (value := _config_value(config, key)) is not None:
            return value
    return None


def stack_depths(names: Iterable[str], config: Mapping | None = None) -> dict[str, int]:
    """Blocks per stack, keyed by stack prefix (``{"decoder.block.": 6, ...}``).

    One stack: its depth is config.json's block count (`LAYER_COUNT_KEYS`) when it says,
    else the highest index + 1. Several: each from its `STACK_DEPTH_KEYS` entry when the
    config has it, else from its names. No blocks: an empty dict.
    """
    depths: dict[str, int] = {}
    for name in names:
        if (b := split_block_name(name)) is not None:
            depths[b.prefix] = max(depths.get(b.prefix, 0), b.index + 1)
    if len(depths) == 1:
        count = _config_count(config)
        return {prefix: count for prefix in depths} if count else depths
    for prefix in depths:
        key = stack_depth_key(prefix)
        if key is not None and (value := _config_value(config, key)) is not None:
            depths[prefix] = value
    return depths


def is_pre_block(name: str) -> bool:
    """True for tensors that precede the blocks (embeddings)."""
    return any(marker in name for marker in _PRE_MARKERS)


def count_blocks(names: Iterable[str], config: Mapping | None = None) -> int:
    """Number of residual blocks: from config.json when it says, else from tensor names.

    For a model with several stacks, the deepest stack's (`stack_depths` gives each).
    """
    depths = stack_depths(names, config)
    if len(depths) > 1:
        return max(depths.values())
    return _config_count(config) or next(iter(depths.values()), 0)


def with_block_count(config: Mapping, source_layers: list[int]) -> dict:
    """A copy of config.json for a model whose block i is source block ``source_layers[i]``.

    Sets the block count and re-indexes per-layer lists (e.g. ``layer_types``) so they
    follow the blocks they describe.
    """
    old_count = config_block_count(config)
    out = dict(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(out.get(key), int):
            out[key] = len(source_layers)
            break
    else:
        out["num_hidden_layers"] = len(source_layers)
    if old_count:
        for key, value in config.items():
            if isinstance(value, list) and len(value) == old_count:
                out[key] = [value[i] for i in source_layers]
    return out


def config_block_count(config: Mapping) -> int | None:
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int):
            return value
    return None


VOCAB_MARKERS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "tok_embeddings", "embed_out")


def is_vocab_tensor(name: str) -> bool:
    """Embedding and output-head tensors, whose first dimension is the vocabulary."""
    return any(marker in name for marker in VOCAB_MARKERS)


# Output heads that transformers ties to the input embedding (``tie_word_embeddings``),
# and the embedding names they share weights with, by model family. A tied model saved
# by transformers stores only the embedding; older savers (and some tools) store both.
TIED_WEIGHTS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma, Phi-3
        "transformer.wte.weight",  # GPT-2, GPT-J
        "model.decoder.embed_tokens.weight",  # OPT
        "transformer.word_embeddings.weight",  # BLOOM, Falcon
        "shared.weight",  # T5
    ),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),  # GPT-NeoX
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
}


def tied_embedding(name: str, ckpt) -> str | None:
    """The embedding that output head ``name`` of ``ckpt`` is tied to, when ``ckpt``'s
    config ties them (``tie_word_embeddings``, true unless the config says otherwise, as
    in transformers) and ``ckpt`` stores that embedding; else None."""
    if name not in TIED_WEIGHTS or not (ckpt.config or {}).get("tie_word_embeddings", True):
        return None
    return next((e for e in TIED_WEIGHTS[name] if e in ckpt), None)
