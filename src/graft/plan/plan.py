"""Turn a recipe plus checkpoint headers into one job per output tensor.

Planning reads headers only. Every check that can fail on the inputs (missing tensors,
shape or vocabulary mismatches, missing or out-of-range parameters) fails here, before a
byte of tensor data is read or anything is written, which is what ``--dry-run`` shows.

Conventions that change results:

* Every tensor of every input model ends up in the output or in `MergePlan.dropped` with
  its reason; planning fails on a tensor that would silently go missing. Deliberate
  drops are the blocks no slice selects and, in the slices form, the tensors outside the
  blocks of models that are not in the first (embeddings) or last (head) slice. Anything
  else is dropped only when an ``allow_drop`` glob (``fnmatch``, ``*`` crosses dots)
  matches its name.
* A non-float tensor (a buffer such as BERT's ``embeddings.position_ids``, which older
  transformers saved and newer ones do not) that only some models store is copied from
  the base, else from the first model that has it, with a note.
* A tied output head (``lm_head.weight``...) that a model does not store, when its config
  ties the embeddings (``tie_word_embeddings``, transformers' default true), is read
  from that model's embedding, as mergekit does, with a note.
* Methods that take no base (linear...) merge a ``base_model`` that is not listed under
  ``models:`` as one more input, with the global parameters, as mergekit does.
* Gradients run over each stack of blocks separately (T5's encoder and decoder, CLIP's
  text and vision towers): block ``l`` of a stack of ``L`` gets ``t = l/(L − 1)``, as
  mergekit's per-module plans do; a block numbered past its stack's configured depth
  (e.g. a multi-token-prediction layer) gets ``t = 1``, with a note. The slices form,
  which renumbers one stack, refuses models with several (mergekit, too, needs its
  ``modules:`` syntax for them).
* ``modules:`` plans each module (`graft.plan.modules` says which tensors it holds) as
  its own ``models:`` or ``slices:`` recipe over just those tensors, with its own method
  and the module's parameters between the slice's and the global ones. Gradients still
  run per stack of blocks; a ``slices:`` module renumbers its own stack and sets its
  depth key in config.json. A tensor of a module the recipe does not list fails the plan
  (mergekit leaves such tensors out of its output) unless ``allow_drop`` matches it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graft.io import Checkpoint, open_checkpoint
from graft.merge import REQUIRED, MethodSpec, Param
from graft.plan.arch import (
    BlockName,
    count_blocks,
    is_pre_block,
    is_vocab_tensor,
    split_block_name,
    stack_depth_key,
    stack_depths,
    tied_embedding,
    with_block_count,
)
from graft.plan.models import open_models, resolve_model_path
from graft.plan.modules import ModuleLayout, other_names, recipe_layout
from graft.plan.quantized import FP8_OUT, plan_fp8
from graft.plan.vocab import RowMap, Vocab, VocabError, plan_vocab
from graft.recipe import ModelRef, ModuleRecipe, OutputSlice, Recipe, RecipeError, evaluate_setting


class PlanError(RecipeError):
    """The recipe does not fit the checkpoints it names."""


@dataclass(frozen=True)
class Source:
    """One input tensor: which model, which tensor name in it."""

    model: ModelRef
    name: str


@dataclass(frozen=True)
class TensorJob:
    """Everything needed to produce one output tensor.

    ``copy`` jobs (non-float tensors, or a single passthrough input with nothing to do)
    write ``base`` (or the only input) unchanged apart from the output dtype.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: tuple[Source, ...]
    base: Source | None
    params: Mapping[str, Any]
    layer: int | None
    seed: int
    copy: bool = False
    stats: tuple[Source | None, ...] = ()
    transpose: bool = False  # stored (in, out) (GPT-2 Conv1D): the method sees (out, in)
    vocab: RowMap | None = None  # rows remapped onto the output vocabulary first (base, inputs)
    fp8_block: tuple[int, int] | None = None  # written float8 + block scales (plan.quantized)
    method: MethodSpec | None = None  # a module's own merge_method; None: the recipe's
    depth: int | None = None  # blocks in this tensor's own stack; None: the plan's num_layers

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype the worker hands the writer: float32 for FP8 outputs, which the
        writer quantizes (`graft.io.quantize_fp8`), else ``out_dtype``."""
        return torch.float32 if self.fp8_block is not None else self.out_dtype


@dataclass(frozen=True)
class Dropped:
    """An input tensor that is not in the output, and why."""

    model: ModelRef
    name: str
    reason: str


@dataclass
class MergePlan:
    """The planned merge: opened checkpoints, jobs in output order, output config.

    Attributes:
        dropped: input tensors deliberately left out of the output, with the reason.
        input_tensors: tensors in the recipe's models, all counted (see `dropped`).
    """

    recipe: Recipe
    checkpoints: dict[ModelRef, Checkpoint]
    jobs: list[TensorJob]
    num_layers: int
    config: dict | None
    sidecar_model: ModelRef
    tokenizer_model: ModelRef | None
    notes: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    input_tensors: int = 0
    vocab: Vocab | None = None
    chat_template: str | None = None

    def input_paths(self) -> list[Path]:
        """Every file or folder the merge reads (models, adapters, statistics files)."""
        paths = []
        for ckpt in self.checkpoints.values():
            paths.append(Path(ckpt.path))
            adapter = getattr(ckpt, "adapter", None)
            if adapter is not None:
                paths.append(Path(adapter.path))
        return paths

    @property
    def method(self) -> MethodSpec:
        return self.recipe.method

    def input_bytes(self, job: TensorJob) -> int:
        srcs = list(job.inputs) + ([job.base] if job.base else []) + [s for s in job.stats if s]
        return sum(self.checkpoints[s.model].info(s.name).nbytes for s in srcs)

    def output_bytes(self) -> int:
        return sum(math.prod(j.shape) * j.out_dtype.itemsize for j in self.jobs)

    def close(self) -> None:
        for ckpt in self.checkpoints.values():
            ckpt.close()


DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,  # block-scaled FP8 (graft.plan.quantized)
}


def plan_merge(
    recipe: Recipe,
    *,
    seed: int | None = None,
    allow_drop: Sequence[str] = (),
    stand_ins: Mapping[str, Checkpoint] | None = None,
    drop_hint: bool = True,
) -> MergePlan:
    """Open the recipe's checkpoints (headers only) and plan every output tensor.

    Args:
        recipe: the parsed recipe.
        seed: for random methods; default the recipe's, else 0.
        allow_drop: globs (``fnmatch``) of tensor names that may be left out of the output
            when they cannot be merged (e.g. a classifier only the fine-tunes have).
        stand_ins: header-only stand-ins for outputs of other documents that are not
            written yet (``--dry-run`` of a multi-document recipe, `graft.plan.multi`).
        drop_hint: errors suggest ``--allow-drop`` (False for commands without it).

    Raises:
        PlanError: the recipe does not fit the checkpoints, or a tensor would be dropped
            that no ``allow_drop`` pattern matches.
    """
    checkpoints = open_models(recipe.referenced_models(), recipe.root, recipe.aliases, stand_ins)
    try:
        seed = seed if seed is not None else recipe.seed or 0
        planner = _Planner(recipe, checkpoints, seed, tuple(allow_drop), stand_ins or {}, drop_hint)
        return planner.plan()
    except BaseException:
        for ckpt in checkpoints.values():
            ckpt.close()
        raise


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: reproducible, independent of thread scheduling."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Planner:
    def __init__(
        self,
        recipe: Recipe,
        checkpoints: dict[ModelRef, Checkpoint],
        seed: int,
        allow_drop: tuple[str, ...] = (),
        stand_ins: Mapping[str, Checkpoint] | None = None,
        drop_hint: bool = True,
    ):
        self.recipe = recipe
        self.stand_ins = stand_ins or {}
        self.vocab: Vocab | None = None
        self.rule_base: ModelRef | None = recipe.base_model
        self.ckpts = checkpoints
        self.method = recipe.method
        self.seed = seed
        self.allow_drop = allow_drop
        self.drop_hint = drop_hint
        self.jobs: list[TensorJob] = []
        self.notes: list[str] = []
        self.dropped: list[Dropped] = []
        self.consumed: set[tuple[ModelRef, str]] = set()
        self.matched: set[str] = set()
        self.stats_checked: set[tuple[ModelRef, ModelRef]] = set()
        self.scope: list[Mapping] = [recipe.parameters]  # shared parameter scopes, in order
        self.layout: ModuleLayout | None = None

    # -- entry -------------------------------------------------------------------------

    def plan(self) -> MergePlan:
        r = self.recipe
        ref_model = r.first_model()
        ref = self.ckpts[ref_model]
        if r.tokenizer is not None:
            self.vocab = self._plan_vocab(ref_model)
            self.notes += self.vocab.notes
        config = ref.config
        if r.modules is not None:
            num_layers = count_blocks(ref.names, ref.config)
            config = self._plan_modules(ref_model, config)
        elif r.models is not None:
            num_layers = count_blocks(ref.names, ref.config)
            self._plan_models(ref_model, r.models)
        else:
            assert r.slices is not None
            source_layers = self._plan_slices(r.slices)
            num_layers = len(source_layers)
            if config is not None:
                config = with_block_count(config, source_layers)
        out_dtype = r.out_dtype or r.dtype
        if config is not None and out_dtype:
            config = dict(config)
            config["torch_dtype"] = out_dtype
            if "dtype" in config:  # transformers >= 4.56 writes "dtype"
                config["dtype"] = out_dtype
        tok = None
        if self.vocab is not None:
            config = _with_vocab_size(config, self.vocab.rows)
            if self.vocab.tokenizer is None and self.vocab.copy_from in self.ckpts:
                tok = self.vocab.copy_from  # nothing added: its files are copied unchanged
        if out_dtype == FP8_OUT:
            self.jobs, config = plan_fp8(self.jobs, self.ckpts, ref_model, config)
        self._check_unique_names()
        inputs = self._check_complete()
        return MergePlan(
            recipe=r,
            checkpoints=self.ckpts,
            jobs=self.jobs,
            num_layers=num_layers,
            config=config,
            sidecar_model=ref_model,
            tokenizer_model=tok,
            notes=self.notes,
            dropped=self.dropped,
            input_tensors=inputs,
            vocab=self.vocab,
            chat_template=self._chat_template(),
        )

    # -- models: form ------------------------------------------------------------------

    def _plan_models(self, ref_model: ModelRef, listed, keep=None) -> None:
        r = self.recipe
        base = r.base_model if self.method.base != "none" else None
        self.rule_base = r.base_model
        entries = [m for m in listed if base is None or m.model != base]
        if not entries:
            raise PlanError(
                f"{self.method.name}: every listed model is the base model; list the "
                "fine-tuned models under models:"
            )
        scopes = {m.model: [m.parameters, *self.scope] for m in entries}
        models = [m.model for m in entries]
        if base is None and r.base_model is not None and r.base_model not in models:
            self._add_unlisted_base(r.base_model, models, scopes)
        others = [m for m in [*([base] if base else []), *models] if m != ref_model]
        names = self._union_names([ref_model, *others])
        depths = stack_depths(names, self.ckpts[ref_model].config)  # every stack, whole model
        for name in names if keep is None else filter(keep, names):
            block = split_block_name(name)
            layer = block.index if block else None
            t = self._stack_t(block, depths)
            srcs = [Source(m, name) for m in models]
            base_src = Source(base, name) if base else None
            depth = depths.get(block.prefix) if block and len(depths) > 1 else None
            self._add_job(name, srcs, base_src, scopes, self.scope, t, layer, depth)

    def _stack_t(self, block: BlockName | None, depths: Mapping[str, int]) -> float:
        """A block's gradient position within its own stack; 0 outside the blocks."""
        if block is None:
            return 0.0
        depth = depths[block.prefix]
        if block.index >= depth:
            note = (
                f"blocks {block.prefix}{depth} and up lie past the {depth} blocks config.json "
                "gives that stack; gradients use t = 1 for them"
            )
            if note not in self.notes:
                self.notes.append(note)
            return 1.0
        return block.index / (depth - 1) if depth > 1 else 1.0

    # -- modules: form -----------------------------------------------------------------

    def _plan_modules(self, ref_model: ModelRef, config: dict | None) -> dict | None:
        """Plan each module of ``modules:`` over its own tensors; returns the output
        config with the depth of every ``slices:`` module set."""
        r = self.recipe
        assert r.modules is not None
        ref = self.ckpts[ref_model]
        wanted = [m.name for m in r.modules]
        layout = self.layout = recipe_layout(ref.config, ref.names, wanted)
        for module in r.modules:
            if layout.get(module.name) is None:
                kind = "inferred from its tensor names" if layout.inferred else "mergekit's names"
                other = other_names(layout, ref.names)
                also = f"; or, all of them, {', '.join(other)}" if other else ""
                raise PlanError(
                    f"modules.{module.name}: {ref_model} ({layout.architecture}) has no module "
                    f"{module.name!r}; its modules ({kind}): {', '.join(layout.names)}{also}"
                )
        for module in r.modules:
            self.method, self.scope = module.method, [module.parameters, r.parameters]

            def keep(n: str, name: str = module.name) -> bool:
                return layout.of(n) == name

            if not any(keep(n) for n in ref.names):
                raise PlanError(
                    f"modules.{module.name}: {ref_model} has no tensors of module {module.name}"
                )
            if module.models is not None:
                self._plan_models(ref_model, module.models, keep)
                continue
            assert module.slices is not None
            depth = len(self._plan_slices(module.slices, keep))
            config = self._module_depth(config, module, depth, keep)
        self.method, self.scope = r.method, [r.parameters]
        return config

    def _module_depth(self, config: dict | None, module: ModuleRecipe, depth: int, keep):
        """``config`` with ``module``'s block count set to ``depth`` (a note if unknown)."""
        layout = self.layout
        assert layout is not None
        key = layout.get(module.name).depth  # type: ignore[union-attr]
        if key is None and layout.inferred:
            prefixes = {b.prefix for n in self.ckpts[self.recipe.first_model()].names
                        if keep(n) and (b := split_block_name(n)) is not None}  # fmt: skip
            if len(layout.modules) == 1:
                return with_block_count(config, list(range(depth))) if config else config
            key = stack_depth_key(next(iter(prefixes))) if len(prefixes) == 1 else None
        if config is None or key is None:
            self.notes.append(
                f"modules.{module.name}: config.json has no block count for this module that "
                f"graft knows; it now has {depth} blocks, check config.json"
            )
            return config
        return _set_config_value(config, key, depth)

    def _slices_of(self, name: str) -> tuple[OutputSlice, ...] | None:
        """The slices that decide whether tensor ``name`` is in the output (None: the
        models form, where every tensor is)."""
        r = self.recipe
        if r.modules is None or self.layout is None:
            return r.slices
        module = self.layout.of(name)
        return next((m.slices for m in r.modules if m.name == module), None)

    # -- slices: form ------------------------------------------------------------------

    def _plan_slices(self, slices: tuple[OutputSlice, ...], keep=None) -> list[int]:
        r = self.recipe
        for model in dict.fromkeys(s.model for sl in slices for s in sl.sources):
            names = self.ckpts[model].names
            stacks = stack_depths(names if keep is None else filter(keep, names))
            if len(stacks) > 1:
                fix = (
                    "split it into modules (graft.plan.modules)"
                    if keep is not None
                    else "merge it with the models: form (gradients then run over each stack)"
                )
                raise PlanError(
                    f"model {model} has {len(stacks)} stacks of blocks "
                    f"({', '.join(f'{p}N' for p in stacks)}); slices: renumbers a single "
                    f"stack, so {fix}"
                )
        out_layer = 0
        source_layers: list[int] = []
        # A module's output stack is its own: LiNeS scales by depth within it, not within
        # the deepest stack of the whole model (the plan's num_layers).
        depth = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)
        self._plan_outside_blocks(slices[0], pre=True, keep=keep)
        for sl in slices:
            base = sl.base_model or r.base_model
            if self.method.base == "none":
                base = None
            srcs = [s for s in sl.sources if base is None or s.model != base]
            if self.method.base == "required" and len(srcs) == len(sl.sources):
                raise PlanError(
                    f"slice with sources {[str(s.model) for s in sl.sources]}: "
                    f"{self.method.name} needs the base model {base} among the slice's sources"
                )
            base_range = next((s.layer_range for s in sl.sources if s.model == base), None)
            scopes = {s.model: [s.parameters, sl.parameters, *self.scope] for s in srcs}
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            lead = sl.sources[0]
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                src_layer = lead.layer_range[0] + offset
                names = self._block_names(lead.model, src_layer, keep=keep)
                keys = {(b.prefix, b.suffix) for b in names}
                for s in sl.sources[1:]:  # what the lead lacks in this block, others may have
                    for b in self._block_names(
                        s.model, s.layer_range[0] + offset, need=False, keep=keep
                    ):
                        if (b.prefix, b.suffix) not in keys:
                            keys.add((b.prefix, b.suffix))
                            names.append(BlockName(b.prefix, src_layer, b.suffix))
                for bn in names:
                    out_name = bn.renumber(out_layer)
                    inputs = [Source(s.model, bn.renumber(s.layer_range[0] + offset)) for s in srcs]
                    base_src = (
                        Source(base, bn.renumber(base_range[0] + offset)) if base_range else None
                    )
                    self._add_job(
                        out_name,
                        inputs,
                        base_src,
                        scopes,
                        [sl.parameters, *self.scope],
                        t,
                        out_layer,
                        depth if keep is not None else None,
                    )
                source_layers.append(src_layer)
                out_layer += 1
        self._plan_outside_blocks(slices[-1], pre=False, keep=keep)
        return source_layers

    def _block_names(
        self, model: ModelRef, layer: int, *, need: bool = True, keep=None
    ) -> list[BlockName]:
        ckpt = self.ckpts[model]
        names = [
            b
            for n in ckpt.names
            if (keep is None or keep(n)) and (b := split_block_name(n)) and b.index == layer
        ]
        if not names and need:
            have = count_blocks(ckpt.names, ckpt.config)
            raise PlanError(
                f"model {model} has no block {layer} (it has {have}); fix the layer_range"
            )
        return names

    def _plan_outside_blocks(self, sl, *, pre: bool, keep=None) -> None:
        r = self.recipe
        base = sl.base_model or r.base_model
        self.rule_base = base
        if self.method.base == "none":
            base = None
        srcs = [s.model for s in sl.sources if base is None or s.model != base]
        scopes = {s.model: [s.parameters, sl.parameters, *self.scope] for s in sl.sources}
        models = [s.model for s in sl.sources] + ([base] if base else [])

        def outside(n: str) -> bool:
            return (
                split_block_name(n) is None and is_pre_block(n) == pre and (keep is None or keep(n))
            )

        for name in self._union_names(models, outside):
            self._add_job(
                name,
                [Source(m, name) for m in srcs],
                Source(base, name) if base else None,
                scopes,
                [sl.parameters, *self.scope],
                0.0,
                None,
            )

    # -- one tensor --------------------------------------------------------------------

    def _add_job(
        self,
        out_name: str,
        inputs: list[Source],
        base: Source | None,
        scopes: Mapping[ModelRef, list[Mapping]],
        shared_scopes: list[Mapping],
        t: float,
        layer: int | None,
        depth: int | None = None,
    ) -> None:
        if not inputs and base is None:
            raise PlanError(f"tensor {out_name}: no input models")
        sources = [*([base] if base else []), *inputs]
        present = [s for s in sources if s.name in self.ckpts[s.model]]
        if len(present) < len(sources):
            filled = self._fill_missing(out_name, inputs, base, present, layer)
            if filled is None:
                return
            inputs, base = filled
            present = [*([base] if base else []), *inputs]
        self.consumed.update((s.model, s.name) for s in present)
        first = base or inputs[0]
        info = self._info(first)
        shape, rmap = tuple(info.shape), None
        if self.vocab is not None and is_vocab_tensor(out_name) and info.dtype.is_floating_point:
            shape, rmap = self._vocab_job(out_name, [*([base] if base else []), *inputs])
        else:
            for src in inputs:
                self._check_match(first, info, src)
        out_dtype = self._out_dtype(info.dtype)
        if not info.dtype.is_floating_point:
            # Integer ids and boolean masks are copied from the base, never averaged.
            self.jobs.append(
                TensorJob(out_name, tuple(info.shape), info.dtype, (), first, {}, layer, 0, True)
            )
            return
        n = len(inputs)
        m = self.method
        if n < m.min_models or (m.max_models is not None and n > m.max_models):
            want = f"{m.min_models}" + (
                "" if m.max_models == m.min_models else f"..{m.max_models or 'any'}"
            )
            raise PlanError(
                f"{m.name} takes {want} non-base model(s) per tensor, got {n} for {out_name}"
            )
        if m.base == "required" and base is None:
            raise PlanError(f"{m.name} needs base_model (tensor {out_name})")
        params = self._resolve(out_name, inputs, scopes, shared_scopes, t)
        if m.check_params is not None:
            problem = m.check_params(params, [str(s.model) for s in inputs])
            if problem:
                raise PlanError(f"{m.name} (tensor {out_name}): {problem}")
        stats, transpose = (
            self._stat_sources(inputs, params.pop("statistics")) if m.stats else ((), False)
        )
        self.jobs.append(
            TensorJob(
                name=out_name,
                shape=shape,
                out_dtype=out_dtype,
                inputs=tuple(inputs),
                base=base,
                params=params,
                layer=layer,
                seed=tensor_seed(self.seed, out_name),
                stats=stats,
                transpose=transpose,
                vocab=rmap,
                method=m if m is not self.recipe.method else None,
                depth=depth,
            )
        )

    # -- tensors some models lack ---------------------------------------------------------

    def _fill_missing(
        self,
        out_name: str,
        inputs: list[Source],
        base: Source | None,
        present: list[Source],
        layer: int | None,
    ) -> tuple[list[Source], Source | None] | None:
        """Plan a tensor that only some models store: copy a buffer, read a tied head from
        the embedding, or drop it (allowed) / fail. Returns the sources to merge, or None
        when the tensor is handled here."""
        missing = [s for s in (*([base] if base else []), *inputs) if s not in present]
        lacking = ", ".join(str(s.model) for s in missing)
        info = self._info(present[0]) if present else None
        if info is not None and not info.dtype.is_floating_point:
            src = base if base in present else present[0]
            for other in present:
                self._check_match(src, info, other)
            self.consumed.update((s.model, s.name) for s in present)
            self.jobs.append(
                TensorJob(out_name, tuple(info.shape), info.dtype, (), src, {}, layer, 0, True)
            )
            self.notes.append(
                f"{out_name} ({str(info.dtype).replace('torch.', '')}) copied from {src.model}; "
                f"not stored by {lacking} (a buffer older transformers saved)"
            )
            return None
        tied = {s: tied_embedding(s.name, self.ckpts[s.model]) for s in missing}
        if present and all(tied.values()):
            swap = {s: Source(s.model, name) for s, name in tied.items() if name}
            self.notes.append(
                f"{out_name}: not stored by {lacking} (tied word embeddings); "
                f"read from {', '.join(f'{s.model}:{s.name}' for s in swap.values())}, "
                "as mergekit does"
            )
            return [swap.get(s, s) for s in inputs], swap.get(base, base) if base else None
        pattern = self._allowed(out_name)
        if pattern is None or not present:
            have = f" ({present[0].model} has it)" if present else ""
            raise PlanError(
                f"tensor {missing[0].name} is missing from model {missing[0].model}{have}; "
                "the models must share an architecture (check the model paths)"
                + self._or_drop(out_name, "to leave it out of the output")
            )
        for s in present:
            self.dropped.append(
                Dropped(s.model, s.name, f"not in {lacking}; --allow-drop {pattern}")
            )
        self.consumed.update((s.model, s.name) for s in present)
        return None

    # -- the output vocabulary -----------------------------------------------------------

    def _plan_vocab(self, ref_model: ModelRef) -> Vocab:
        r = self.recipe
        spec = r.tokenizer
        assert spec is not None
        source = None
        if isinstance(spec.source, ModelRef):
            ref = spec.source
            source = self.ckpts.get(ref) or self.stand_ins.get(ref.path)
            if source is None:
                source = resolve_model_path(ref, r.root, r.aliases)
        return plan_vocab(spec, ref_model, r.referenced_models(), self.ckpts, source)

    def _vocab_job(self, out_name: str, sources: list[Source]) -> tuple[tuple[int, ...], RowMap]:
        """The output shape of a vocabulary tensor and how its rows are mapped."""
        infos = [self._info(s) for s in sources]
        tail = tuple(infos[0].shape[1:])
        for src, info in zip(sources, infos, strict=True):
            if tuple(info.shape[1:]) != tail:
                raise PlanError(
                    f"shape mismatch for {src.name}: {sources[0].model} has "
                    f"{tuple(infos[0].shape)}, {src.model} has {tuple(info.shape)}; the models "
                    "are not the same architecture"
                )
        assert self.vocab is not None
        rows_of = {s.model: int(i.shape[0]) for s, i in zip(sources, infos, strict=True)}
        try:
            rmap = self.vocab.row_map([s.model for s in sources], self.rule_base, rows_of)
        except VocabError as e:
            raise PlanError(f"{out_name}: {e}") from None
        return (self.vocab.rows, *tail), rmap

    def _chat_template(self) -> str | None:
        """The recipe's chat_template; ``auto``: the most common among the inputs' (ties:
        the first in recipe order), None when none has one (the copied one stays)."""
        from collections import Counter

        from graft.io import read_chat_template

        template = self.recipe.chat_template
        if template != "auto":
            return template
        found = []
        for ref in self.recipe.referenced_models():
            text = read_chat_template(self.ckpts[ref].root)
            if text:
                found.append(text.strip())
        if not found:
            self.notes.append("chat_template: auto, but no input has a chat template; none set")
            return None
        pick, count = Counter(found).most_common(1)[0]
        self.notes.append(
            f"chat_template: auto picked the template {count} of {len(found)} input(s) carry"
        )
        return pick

    def _add_unlisted_base(
        self, base: ModelRef, models: list[ModelRef], scopes: dict[ModelRef, list[Mapping]]
    ) -> None:
        """mergekit merges a base_model missing from ``models:`` as one more input (with
        the global parameters) for methods that take no base; so does graft."""
        for p in self.method.params:
            if (
                p.per_model
                and p.default is REQUIRED
                and not any(p.name in scope for scope in self.scope)
            ):
                raise PlanError(
                    f"{self.method.name}: base_model {base} is not listed under models:, so "
                    f"it is merged as one more input (as mergekit does) and needs a "
                    f"'{p.name}'; list it under models: with its {p.name}, set {p.name} "
                    "under parameters:, or remove base_model"
                )
        models.append(base)
        scopes[base] = list(self.scope)
        self.notes.append(
            f"base_model {base} is not listed under models:; {self.method.name} merges it as "
            "one more input with the global parameters, as mergekit does"
        )

    def _union_names(self, models: Sequence[ModelRef], keep=None) -> list[str]:
        """Tensor names of all ``models``, the first model's order first."""
        names: dict[str, None] = {}
        for m in dict.fromkeys(models):
            for n in self.ckpts[m].names:
                if keep is None or keep(n):
                    names.setdefault(n, None)
        return list(names)

    def _allowed(self, name: str) -> str | None:
        for pattern in self.allow_drop:
            if fnmatch.fnmatchcase(name, pattern):
                self.matched.add(pattern)
                return pattern
        return None

    def _check_complete(self) -> int:
        """Every tensor of every model is in the output or in `dropped` (with a reason);
        returns how many tensors the models hold."""
        r = self.recipe
        listed = {(d.model, d.name) for d in self.dropped}
        total = 0
        for model in r.referenced_models():
            names = self.ckpts[model].names
            total += len(names)
            for name in names:
                if (model, name) in self.consumed or (model, name) in listed:
                    continue
                reason = self._deliberate(model, name)
                if reason is None and (pattern := self._allowed(name)) is not None:
                    reason = f"--allow-drop {pattern}"
                if reason is None:
                    raise PlanError(self._not_in_output(model, name))
                self.dropped.append(Dropped(model, name, reason))
        for pattern in self.allow_drop:
            if pattern not in self.matched:
                self.notes.append(f"--allow-drop {pattern} matched no tensor")
        return total

    def _or_drop(self, name: str, why: str) -> str:
        """The ``--allow-drop`` way out of an error, for callers that offer it."""
        return f", or pass --allow-drop '{name}' {why}" if self.drop_hint else ""

    def _not_in_output(self, model: ModelRef, name: str) -> str:
        drop = self._or_drop(name, "to leave it out knowingly")
        r = self.recipe
        if r.modules is None or self.layout is None:
            return (
                f"tensor {name} of model {model} would not be in the output; check the recipe{drop}"
            )
        module = self.layout.of(name)
        if module is None:
            return (
                f"tensor {name} of model {model} belongs to none of the modules of "
                f"{self.layout.architecture} ({', '.join(self.layout.names)}); merge the model "
                f"with models: instead{drop}"
            )
        if module not in {m.name for m in r.modules}:
            return (
                f"tensor {name} of model {model} is in module {module}, which modules: does "
                f"not list (mergekit leaves such tensors out); add {module}: {{models: [...]}} "
                f"to modules:" + self._or_drop(name, "(globs work) to leave it out")
            )
        return (
            f"tensor {name} of model {model} would not be in the output: model {model} is not "
            f"an input of module {module}; list it there{drop}"
        )

    def _deliberate(self, model: ModelRef, name: str) -> str | None:
        """Why the slices form (or a module that does not take ``model``) leaves this
        tensor out, or None when it should not."""
        module = None
        if self.recipe.modules is not None and self.layout is not None:
            of = self.layout.of(name)
            module = next((m for m in self.recipe.modules if m.name == of), None)
        method = module.method if module is not None else self.method
        takes_base = model == self.recipe.base_model and method.base != "none"
        if module is not None and model not in module.referenced_models() and not takes_base:
            return f"module {module.name} does not take this model"
        slices = self._slices_of(name)
        if slices is None:
            return None
        block = split_block_name(name)
        if block is not None:
            for sl in slices:
                for s in sl.sources:
                    if s.model == model and s.layer_range[0] <= block.index < s.layer_range[1]:
                        return None
            return f"block {block.index} is in no slice's layer_range"
        pre = is_pre_block(name)
        sl = slices[0] if pre else slices[-1]
        base = (sl.base_model or self.recipe.base_model) if method.base != "none" else None
        if model in {s.model for s in sl.sources} or model == base:
            return None
        where = "first" if pre else "last"
        return f"outside the blocks, tensors come from the {where} slice's models"

    def _stat_sources(
        self, inputs: list[Source], paths: list[str]
    ) -> tuple[tuple[Source | None, ...], bool]:
        """Each input's statistic for this tensor (None where the file has none), and
        whether the weight is stored input-first (``graft_input_first`` in the files:
        transformers' Conv1D), so the method must see it transposed."""
        out = []
        transpose = False
        for src, path in zip(inputs, paths, strict=True):
            ref = self._stats_file(src.model, path)
            if src.name not in self.ckpts[ref]:
                out.append(None)
                continue
            shape = tuple(self.ckpts[src.model].info(src.name).shape)
            first = src.name in _input_first(self.ckpts[ref], path)
            if first != transpose and out and any(o is not None for o in out):
                raise PlanError(
                    f"statistics files disagree on the layout of {src.name} ({path}); "
                    "compute them all with this graft version"
                )
            transpose = first
            oriented = shape[::-1] if first else shape
            want = self.method.stats_shape(oriented) if self.method.stats_shape else None
            have = tuple(self.ckpts[ref].info(src.name).shape)
            if want is not None and have != tuple(want):
                raise PlanError(
                    f"statistics file {path} has shape {have} for {src.name}, expected "
                    f"{tuple(want)} for a tensor of shape {shape}; recompute it for {src.model}"
                )
            out.append(Source(ref, src.name))
        return tuple(out), transpose

    def _stats_file(self, model: ModelRef, path: str) -> ModelRef:
        """Open a statistics file (once) and check, once per model, that it describes
        that model and holds the statistic this method reads."""
        ref = ModelRef(path)
        if (model, ref) in self.stats_checked:
            return ref
        hint = f"compute it with `graft stats {self.method.stats} {model} --task T -o {path}`"
        if ref not in self.ckpts:
            file = Path(path).expanduser()
            if not file.exists() and self.recipe.root is not None and not file.is_absolute():
                file = self.recipe.root / path
            if not file.exists():
                raise PlanError(f"statistics file {path} not found (for model {model}); {hint}")
            self.ckpts[ref] = open_checkpoint(file)
        ckpt = self.ckpts[ref]
        kind = ckpt.metadata.get("graft_statistic")
        if kind != self.method.stats:
            raise PlanError(
                f"statistics file {path} holds {kind or 'no graft statistic'}, but "
                f"{self.method.name} needs {self.method.stats}; {hint}"
            )
        if ckpt.metadata.get("graft_model_fingerprint") != self.ckpts[model].fingerprint():
            raise PlanError(
                f"statistics file {path} was computed on a different model than {model}; "
                f"recompute it: {hint}"
            )
        self.stats_checked.add((model, ref))
        return ref

    def _info(self, src: Source):
        ckpt = self.ckpts[src.model]
        if src.name not in ckpt:
            raise PlanError(
                f"tensor {src.name} is missing from model {src.model}; "
                "the models must share an architecture (check the model paths)"
            )
        return ckpt.info(src.name)

    def _check_match(self, ref: Source, ref_info, src: Source) -> None:
        info = self._info(src)
        if tuple(info.shape) == tuple(ref_info.shape):
            return
        if is_vocab_tensor(src.name) and tuple(info.shape[1:]) == tuple(ref_info.shape[1:]):
            raise PlanError(
                f"vocabulary size differs for {src.name}: {ref.model} has {ref_info.shape[0]} "
                f"rows, {src.model} has {info.shape[0]}; add tokenizer_source: base (or "
                "union) to the recipe to map the rows by token, as mergekit asks too"
            )
        raise PlanError(
            f"shape mismatch for {src.name}: {ref.model} has {tuple(ref_info.shape)}, "
            f"{src.model} has {tuple(info.shape)}; the models are not the same architecture"
        )

    def _out_dtype(self, stored: torch.dtype) -> torch.dtype:
        name = self.recipe.out_dtype or self.recipe.dtype
        if name is None or not stored.is_floating_point:
            return stored
        return DTYPES[name]

    def _resolve(
        self,
        tensor: str,
        inputs: list[Source],
        scopes: Mapping[ModelRef, list[Mapping]],
        shared_scopes: list[Mapping],
        t: float,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.method.params:
            if p.per_model:
                out[p.argname] = [
                    _resolve_one(p, scopes.get(s.model, shared_scopes), tensor, t, str(s.model))
                    for s in inputs
                ]
            else:
                out[p.argname] = _resolve_one(p, shared_scopes, tensor, t, None)
        return out

    def _check_unique_names(self) -> None:
        seen: set[str] = set()
        for job in self.jobs:
            if job.name in seen:
                raise PlanError(f"tensor {job.name} would be written twice; check the slices")
            seen.add(job.name)


def _input_first(ckpt: Checkpoint, path: str) -> frozenset[str]:
    """The tensor names a statistics file marks as stored (in, out)."""
    raw = ckpt.metadata.get("graft_input_first")
    if not raw:
        return frozenset()
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PlanError(f"statistics file {path} has malformed graft_input_first metadata")
    return frozenset(names)


def _resolve_one(p: Param, scopes: list[Mapping], tensor: str, t: float, model: str | None) -> Any:
    where = f"parameter '{p.name}'" + (f" of model {model}" if model else "") + f" ({tensor})"
    value = None
    for scope in scopes:
        if p.name in scope:
            value = evaluate_setting(scope[p.name], tensor, t, kind=p.kind, where=where)
            if value is not None:
                break
    if value is None:
        if p.default is REQUIRED:
            hint = "under the model's parameters or globally" if model else "under parameters"
            raise PlanError(f"missing required {where}; set {p.name} {hint}")
        value = p.default
    if p.choices and value not in p.choices:
        raise PlanError(f"{where}: '{value}' is not one of {', '.join(p.choices)}")
    if p.check is not None and value is not None:
        problem = p.check(value)
        if problem:
            raise PlanError(f"{where}: {problem}")
    return value


def _set_config_value(config: dict, key: str, value: int) -> dict:
    """A copy of ``config`` with dotted ``key`` (``text_config.num_hidden_layers``) set."""
    head, _, rest = key.partition(".")
    out = dict(config)
    if not rest:
        out[head] = value
    else:
        out[head] = _set_config_value(dict(out.get(head) or {}), rest, value)
    return out


def _with_vocab_size(config: dict | None, rows: int) -> dict | None:
    """``config`` with its vocabulary size set to the output's rows (mergekit sets the
    architecture's vocab_size key; for multimodal configs that is text_config's)."""
    if config is None:
        return None
    out = dict(config)
    if "vocab_size" in out or not isinstance(out.get("text_config"), dict):
        out["vocab_size"] = rows
    else:
        out["text_config"] = {**out["text_config"], "vocab_size": rows}
    return out
