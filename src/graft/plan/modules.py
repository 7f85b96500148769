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

# Architectures graft has a template for and mergekit 0.1.5 does not: mergekit infers their
# modules (`inferred_layout`), so a recipe written for mergekit names those instead.
GRAFT_ONLY = frozenset({"LlavaForConditionalGeneration"})

# mergekit infers module names from the tensor names of the model transformers builds
# (``model.language_model.layers`` under transformers 5), while the checkpoint may hold the
# older layout (``language_model.model.layers``); a stack answers to either spelling.
LAYOUT_ALIASES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("vision_model.", "model.vision_model."),
    ("visual.", "model.visual."),
)


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
            # an inferred module holds one stack, named after it or as the recipe spells it
            found = (m.name for m in self.modules if block.prefix in m.prefixes)
            return next(found, block.prefix.removesuffix("."))
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


def recipe_layout(
    config: Mapping | None, names: Iterable[str], wanted: Iterable[str]
) -> ModuleLayout:
    """The modules of this model as a recipe naming modules ``wanted`` sees them.

    As `module_layout`, except where mergekit would infer the modules (no template in
    mergekit, `GRAFT_ONLY` included) and the recipe names the inferred modules: then the
    inferred layout, each stack under the recipe's spelling of it (`LAYOUT_ALIASES`). A
    name found in neither is left for the caller to report against the first layout.
    """
    names, wanted = list(names), list(wanted)
    layout = module_layout(config, names)
    if all(w in layout.names for w in wanted):
        return layout
    if not layout.inferred and layout.architecture not in GRAFT_ONLY:
        return layout  # mergekit uses its template too, and fails the same way
    inferred = inferred_layout(layout.architecture, names)

    def spelled(module: ModuleDef) -> str:  # the recipe's spelling of this stack, if any
        forms = _spellings(module.name + ".")
        return next((w for w in wanted if w + "." in forms), module.name)

    mods = tuple(ModuleDef(spelled(m), m.prefixes, m.depth) for m in inferred.modules)
    result = ModuleLayout(inferred.architecture, mods, inferred=True)
    found = lambda lay: sum(w in lay.names for w in wanted)  # noqa: E731
    return result if found(result) > found(layout) else layout  # the nearer, for the error


def other_names(layout: ModuleLayout, names: Iterable[str]) -> tuple[str, ...]:
    """For a `GRAFT_ONLY` architecture, the module names of the layout not in use (graft's
    template or mergekit's inferred names): an error about a module name lists them too."""
    if layout.architecture not in GRAFT_ONLY:
        return ()
    if layout.inferred:
        return tuple(m.name for m in MODULES[layout.architecture])
    return inferred_layout(layout.architecture, names).names


def _spellings(prefix: str) -> set[str]:
    """``prefix`` in both transformers layouts (`LAYOUT_ALIASES`)."""
    out = {prefix}
    for old, new in LAYOUT_ALIASES:
        for a, b in ((old, new), (new, old)):
            if prefix.startswith(a):
                out.add(b + prefix[len(a) :])
    return out


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
