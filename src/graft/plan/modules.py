"""Which tensors belong to which module of a multi-module model, as data.

A ``modules:`` recipe merges each module (a vision-language model's text decoder, vision
tower and projector; T5's encoder and decoder) with its own models, parameters and, in
graft, method. The module names are mergekit 0.1.5's: those of its architecture
templates where it has one (`MODULES`, by config.json's ``architectures[0]``), else the
names its inferred architectures give (`inferred_layout`).

A tensor belongs to the module whose prefix is the longest that starts its name; each
module lists the prefixes of both transformers layouts (``language_model.model.`` as
transformers 4 and 5 save LLaVA-style models; ``model.language_model.`` as their modules
name them). ``depth`` is the config.json key of the module's block count, which a
``slices:`` module sets in the output config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from graft.plan.arch import split_block_name


@dataclass(frozen=True)
class ModuleDef:
    name: str
    prefixes: tuple[str, ...]
    depth: str | None = None


_TEXT = ModuleDef(
    "text_decoder",
    ("language_model.", "model.language_model.", "lm_head."),
    "text_config.num_hidden_layers",
)
_PROJECTOR = ModuleDef(
    "multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector.")
)
_VISION_TOWER = ModuleDef(
    "vision_tower", ("vision_tower.", "model.vision_tower."), "vision_config.num_hidden_layers"
)
_LLAVA_LIKE = (_TEXT, _VISION_TOWER, _PROJECTOR)
_QWEN_VL = (
    ModuleDef("text_decoder", ("model.", "lm_head."), "text_config.num_hidden_layers"),
    ModuleDef("vision_tower", ("visual.", "model.visual."), "vision_config.depth"),
    ModuleDef(
        "multi_modal_projector",
        (
            "visual.merger.",
            "model.visual.merger.",
            "visual.deepstack_merger_list.",
            "model.visual.deepstack_merger_list.",
        ),
    ),
)

# mergekit 0.1.5's modular templates (mergekit/_data/architectures/*.json), plus LLaVA.
MODULES: dict[str, tuple[ModuleDef, ...]] = {
    # graft's: mergekit has no LLaVA template (it infers modules from the tensor names,
    # `inferred_layout`); LLaVA gets the names of mergekit's Mistral3 template, its twin.
    "LlavaForConditionalGeneration": _LLAVA_LIKE,
    "Mistral3ForConditionalGeneration": _LLAVA_LIKE,
    "Gemma3ForConditionalGeneration": _LLAVA_LIKE,
    "Llama4ForConditionalGeneration": (
        _TEXT,
        ModuleDef(
            "vision_model",
            ("vision_model.", "model.vision_model."),
            "vision_config.num_hidden_layers",
        ),
        _PROJECTOR,
    ),
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN_VL,
    "T5ForConditionalGeneration": (
        ModuleDef("encoder", ("encoder.",), "num_layers"),
        ModuleDef("decoder", ("decoder.",), "num_decoder_layers"),
        ModuleDef("shared", ("shared.", "lm_head.")),
    ),
    "WhisperForConditionalGeneration": (
        ModuleDef("encoder", ("model.encoder.",), "encoder_layers"),
        ModuleDef("decoder", ("model.decoder.", "proj_out."), "decoder_layers"),
    ),
}

DEFAULT = "default"


@dataclass(frozen=True)
class ModuleLayout:
    """A model's modules: ``of(name)`` gives a tensor's module (None: no module)."""

    architecture: str
    modules: tuple[ModuleDef, ...]
    inferred: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def get(self, name: str) -> ModuleDef | None:
        return next((m for m in self.modules if m.name == name), None)

    def of(self, tensor: str) -> str | None:
        if self.inferred:
            block = split_block_name(tensor)
            if block is None or len(self.modules) == 1:
                return DEFAULT
            return block.prefix.removesuffix(".")
        best, length = None, -1
        for m in self.modules:
            for p in m.prefixes:
                if tensor.startswith(p) and len(p) > length:
                    best, length = m.name, len(p)
        return best


def module_layout(config: Mapping | None, names: Iterable[str]) -> ModuleLayout:
    """The modules of a model with this config.json and these tensor names."""
    archs = (config or {}).get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch in MODULES:
        return ModuleLayout(arch, MODULES[arch])
    return inferred_layout(arch, names)


def inferred_layout(arch: str, names: Iterable[str]) -> ModuleLayout:
    """mergekit's inferred architecture: with one stack of blocks, one module
    ``default``; with several, one module per stack, named by the stack's prefix without
    its trailing dot (``encoder.layer``), plus ``default`` for every tensor outside the
    blocks."""
    stacks = dict.fromkeys(b.prefix for n in names if (b := split_block_name(n)) is not None)
    if len(stacks) <= 1:
        return ModuleLayout(arch or "unknown", (ModuleDef(DEFAULT, ()),), inferred=True)
    mods = [ModuleDef(p.removesuffix("."), (p,)) for p in stacks] + [ModuleDef(DEFAULT, ())]
    return ModuleLayout(arch or "unknown", tuple(mods), inferred=True)
