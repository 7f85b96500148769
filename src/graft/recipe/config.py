"""mergekit-compatible merge recipes as frozen dataclasses.

Accepted top-level keys are mergekit's for the methods graft implements: ``models``,
``slices`` *or* ``modules``, ``merge_method``, ``base_model``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source`` *or* ``tokenizer`` (`graft.recipe._tokens`), ``chat_template``,
``name`` (a document's name in a multi-document recipe, `graft.recipe.multi`) and
``embed_slerp`` (mergekit 0.1.5 ignores it; so does graft). graft adds one: ``seed``
(random methods; ``--seed`` overrides).
Parameter precedence follows mergekit: a model's own (or a slice source's) parameters,
then the slice's, then the module's (``modules:``), then the global ``parameters``.

``modules:`` (mergekit's multi-module recipes, for vision-language models, T5...) maps a
module name to its own ``models:`` or ``slices:`` and ``parameters:``; which tensors form
which module is `graft.plan.modules`. graft adds a module-level ``merge_method``
(mergekit ignores the key and merges every module with the top-level method).

Method names and parameters are checked against the registry here, before any file is
opened, so a typo fails in milliseconds with the list of valid names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.io._readers import load_yaml
from graft.merge import METHODS, MethodSpec, get_method
from graft.recipe._settings import RecipeError, parse_setting, show
from graft.recipe._tokens import TokenizerSpec, parse_chat_template, parse_tokenizer

TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "seed",
    "name",
    "embed_slerp",
)
MODULE_KEYS = ("models", "slices", "parameters", "merge_method")
DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
# Outputs may also be FP8 with fresh block scales (graft.plan.quantized).
OUT_DTYPES = (*DTYPES, "float8_e4m3fn")
OUT_DTYPE_ALIASES = {**DTYPE_ALIASES, "fp8": "float8_e4m3fn"}
# Recipes are a few hundred bytes; these bounds only keep hostile ones from costing memory
# or the stack. YAML aliases are allowed (yaml.safe_dump writes them for shared values)
# but count as the nodes they expand to, so an alias bomb is refused while still small.
# Layer indexes share config.json's bound (`graft.io` MAX_LAYERS).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000
MAX_LAYER = 100_000
MAX_SEED = 2**63 - 1
MAX_MODULES = 64
MAX_MODULE_NAME = 200
# mergekit's module names are identifiers or dotted tensor prefixes; anything else (a
# newline, a terminal escape) would end up in error messages.
MODULE_NAME = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_MODULE_NAME}}}")


@dataclass(frozen=True)
class ModelRef:
    """A model as written in the recipe: a path or hub id, optionally pinned to a revision
    and with a LoRA adapter, as mergekit writes it: ``model[@revision][+adapter[@revision]]``.

    A revision (branch, tag or commit hash) is looked up in the local Hugging Face cache
    only (`graft.plan.models`); graft never downloads.
    """

    path: str
    adapter: str | None = None
    revision: str | None = None
    adapter_revision: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> ModelRef:
        if isinstance(raw, dict):  # mergekit's serialised form: {model: {path, revision}, lora}
            return cls._parse_dict(raw, where)
        if not isinstance(raw, str) or not raw.strip():
            raise RecipeError(f"{where}: model must be a path or hub id string, got {show(raw)}")
        chunks = raw.strip().split("+")
        if len(chunks) > 2:
            raise RecipeError(
                f"{where}: {show(raw)} has more than one '+'; write MODEL or MODEL+LORA_ADAPTER"
            )
        path, revision = _split_revision(chunks[0], raw, where)
        adapter, adapter_rev = (
            _split_revision(chunks[1], raw, where) if len(chunks) == 2 else (None, None)
        )
        return cls(path=path, adapter=adapter, revision=revision, adapter_revision=adapter_rev)

    @classmethod
    def _parse_dict(cls, raw: dict, where: str) -> ModelRef:
        unknown = set(raw) - {"model", "lora", "override_architecture"}
        if unknown or "model" not in raw:
            raise RecipeError(
                f"{where}: write the model as a path string, e.g. model: ./my-model "
                "(or mergekit's {model: {path: ..., revision: ...}, lora: ...})"
            )
        if raw.get("override_architecture") is not None:
            raise RecipeError(f"{where}: override_architecture is not supported; remove it")
        path, revision = _path_revision(raw["model"], f"{where}.model")
        adapter, adapter_rev = (
            _path_revision(raw["lora"], f"{where}.lora") if raw.get("lora") else (None, None)
        )
        return cls(path=path, adapter=adapter, revision=revision, adapter_revision=adapter_rev)

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.adapter:
            rev = f"@{self.adapter_revision}" if self.adapter_revision else ""
            text += f"+{self.adapter}{rev}"
        return text


def _split_revision(chunk: str, raw: str, where: str) -> tuple[str, str | None]:
    """``path@revision`` -> (path, revision); mergekit refuses more than one ``@``."""
    if chunk.count("@") > 1:
        raise RecipeError(f"{where}: {show(raw)} has more than one '@'; write PATH@REVISION")
    path, at, revision = chunk.partition("@")
    if not path.strip() or (at and not revision.strip()):
        raise RecipeError(f"{where}: {show(raw)} is missing a path or a revision around '@'")
    return path.strip(), revision.strip() or None


def _path_revision(raw: Any, where: str) -> tuple[str, str | None]:
    if isinstance(raw, str):
        return _split_revision(raw, raw, where)
    if (
        isinstance(raw, dict)
        and set(raw) <= {"path", "revision"}
        and isinstance(raw.get("path"), str)
        and raw["path"].strip()
        and (raw.get("revision") is None or isinstance(raw["revision"], str))
    ):
        return raw["path"].strip(), raw.get("revision") or None
    raise RecipeError(f"{where}: expected a path string or {{path: ..., revision: ...}}")


Settings = Mapping[str, Any]


@dataclass(frozen=True)
class InputModel:
    model: ModelRef
    parameters: Settings = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Settings = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: ModelRef | None = None
    parameters: Settings = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleRecipe:
    """One entry of ``modules:``: a module's own inputs, parameters and method.

    Attributes:
        name: the module's name (`graft.plan.modules` says which tensors it holds).
        method: the module's ``merge_method`` (graft's) or else the recipe's.
        models / slices: exactly one is set, as for a whole recipe.
        parameters: the module's parameters, between the slice's and the global ones.
    """

    name: str
    method: MethodSpec
    models: tuple[InputModel, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Settings = field(default_factory=dict)

    def referenced_models(self) -> list[ModelRef]:
        refs = [m.model for m in self.models or ()]
        for s in self.slices or ():
            refs += [src.model for src in s.sources]
            if s.base_model:
                refs.append(s.base_model)
        return refs


@dataclass(frozen=True)
class Recipe:
    """A validated merge recipe.

    Attributes:
        method: the registry entry for ``merge_method``.
        models: the ``models:`` form (None when ``slices:`` or ``modules:`` is used).
        slices: the ``slices:`` form (None when ``models:`` or ``modules:`` is used).
        modules: the ``modules:`` form, in recipe order (None otherwise).
        dtype / out_dtype: mergekit's storage dtypes; graft always *computes* in float32
            (float64 where a method asks) and writes ``out_dtype`` or else ``dtype`` or
            else each tensor's own storage dtype.
        text: the YAML as given, embedded in the model card and hashed into metadata.
        root: folder of the recipe file; relative model paths that do not exist from the
            working directory are looked up there.
        tokenizer: ``tokenizer_source`` or the ``tokenizer:`` block: which vocabulary the
            output gets and how embedding rows are mapped to it (None: the embeddings are
            merged row by row and the tokenizer files of the base, else the first model,
            are copied).
        chat_template: the Jinja template to write into the output tokenizer, or
            ``"auto"`` (the most common among the inputs); a mergekit template name
            (``chatml``...) is already expanded.
        name: the document's ``name:`` (multi-document recipes).
        aliases: model references that name another document of a multi-document recipe,
            mapped to that document's output folder (`graft.recipe.multi`).
    """

    method: MethodSpec
    base_model: ModelRef | None
    models: tuple[InputModel, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Settings
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    seed: int | None
    text: str
    root: Path | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    name: str | None = None
    aliases: Mapping[str, Path] = field(default_factory=dict)
    modules: tuple[ModuleRecipe, ...] | None = None

    def first_model(self) -> ModelRef:
        """The base model, else the first model the recipe lists."""
        if self.base_model is not None:
            return self.base_model
        return self.referenced_models()[0]

    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe names, base first, each once, in recipe order."""
        refs: list[ModelRef] = [self.base_model] if self.base_model else []
        if self.models:
            refs += [m.model for m in self.models]
        for s in self.slices or ():
            refs += [src.model for src in s.sources]
            if s.base_model:
                refs.append(s.base_model)
        for module in self.modules or ():
            refs += module.referenced_models()
        return list(dict.fromkeys(refs))

    def named_models(self) -> list[ModelRef]:
        """`referenced_models` plus the models named only for their tokenizer (a
        ``tokenizer`` source, a token's source)."""
        refs = self.referenced_models()
        tok = self.tokenizer
        if tok is not None:
            if isinstance(tok.source, ModelRef):
                refs.append(tok.source)
            refs += [s.source.model for s in tok.tokens.values() if s.source and s.source.model]
        return list(dict.fromkeys(refs))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (UTF-8 YAML, at most `MAX_RECIPE_BYTES`).

    Raises:
        RecipeError: the file is missing, not a regular file, too large, not UTF-8, or
            not a valid recipe (a multi-document file: use `graft.recipe.load_recipes`).
    """
    p = Path(path)
    return parse_recipe(read_recipe_text(p), root=p.resolve().parent)


def read_recipe_text(p: Path) -> str:
    """The text of recipe file ``p``, checked to be a small UTF-8 regular file.

    Raises:
        RecipeError: it is not.
    """
    if not p.exists():
        raise RecipeError(f"recipe file not found: {p}")
    if not p.is_file():
        raise RecipeError(f"recipe {p} is not a regular file; pass a .yaml file")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read recipe {p}: {e.strerror}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {p} is larger than {MAX_RECIPE_BYTES:,} bytes; is it a recipe?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe {p} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8"
        ) from None


def parse_recipe(text: str, *, root: Path | None = None) -> Recipe:
    """Parse recipe YAML text into a validated ``Recipe``.

    Raises:
        RecipeError: one line saying what to change.
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES:,} bytes; is it a recipe?")
    try:
        raw = load_yaml(text, max_nodes=MAX_RECIPE_NODES)
    except ValueError as exc:
        if "expected a single document" in str(exc):
            raise RecipeError(
                "recipe holds several YAML documents; `graft merge` runs them in order "
                "(graft.recipe.load_recipes)"
            ) from None
        raise RecipeError(f"recipe is not valid YAML: {exc}") from None
    return recipe_from_mapping(raw, text=text, root=root)


def recipe_from_mapping(raw: Any, *, text: str, root: Path | None = None) -> Recipe:
    """Validate one parsed YAML document (``text`` is its source, kept for the model card).

    Raises:
        RecipeError: one line saying what to change.
    """
    if not isinstance(raw, dict):
        raise RecipeError("recipe must be a YAML mapping with at least merge_method and models")
    if "experts" in raw and "merge_method" not in raw:
        raise RecipeError(
            "this is a mergekit-moe recipe (it lists experts); run graft moe RECIPE OUT"
        )
    for key in raw:
        if not isinstance(key, str):
            raise RecipeError(f"unknown recipe key {show(key)}; valid keys: {', '.join(TOP_KEYS)}")
        if key not in TOP_KEYS:
            raise RecipeError(f"unknown recipe key {show(key)}; valid keys: {', '.join(TOP_KEYS)}")
    if "merge_method" not in raw:
        raise RecipeError(f"recipe needs merge_method; one of: {', '.join(METHODS)}")
    if not isinstance(raw["merge_method"], str) or raw["merge_method"] not in METHODS:
        valid = ", ".join(sorted(METHODS))
        raise RecipeError(f"unknown merge method {show(raw['merge_method'])}; valid: {valid}")
    method = get_method(raw["merge_method"])

    forms = [k for k in ("models", "slices", "modules") if raw.get(k) is not None]
    if len(forms) != 1:
        raise RecipeError("recipe needs exactly one of 'models', 'slices' or 'modules'")
    base = ModelRef.parse(raw["base_model"], "base_model") if raw.get("base_model") else None
    models = _parse_models(raw["models"], method) if forms == ["models"] else None
    slices = _parse_slices(raw["slices"], method) if forms == ["slices"] else None
    modules = _parse_modules(raw["modules"], method) if forms == ["modules"] else None
    params = _parse_params(raw.get("parameters"), method, "parameters", per_model_ok=True)
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise RecipeError(
            "give tokenizer_source or a tokenizer: block, not both (mergekit refuses both too)"
        )
    if raw.get("embed_slerp") not in (None, True, False):
        raise RecipeError(f"embed_slerp must be true or false, got {show(raw['embed_slerp'])}")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise RecipeError(f"name must be a non-empty string, got {show(name)}")
    tokenizer = parse_tokenizer(raw.get("tokenizer_source"), raw.get("tokenizer"), ModelRef.parse)

    recipe = Recipe(
        method=method,
        base_model=base,
        models=models,
        slices=slices,
        parameters=params,
        dtype=_parse_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_parse_dtype(raw.get("out_dtype"), "out_dtype", OUT_DTYPES, OUT_DTYPE_ALIASES),
        tokenizer_source=str(tokenizer.source) if tokenizer else None,
        seed=_parse_seed(raw.get("seed")),
        text=text,
        root=root,
        tokenizer=tokenizer,
        chat_template=parse_chat_template(raw.get("chat_template")),
        name=name,
        modules=modules,
    )
    for module in modules or ():
        _check_base(module.method, recipe.base_model, module.slices, f"modules.{module.name}: ")
    if modules is None:
        _check_base(method, recipe.base_model, slices)
    return recipe


def _parse_modules(raw: Any, method: MethodSpec) -> tuple[ModuleRecipe, ...]:
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(
            "'modules' must be a mapping of module name to {models: [...]} or {slices: [...]}"
        )
    if len(raw) > MAX_MODULES:
        raise RecipeError(f"'modules' lists {len(raw)} modules; at most {MAX_MODULES}")
    out = []
    for name, entry in raw.items():
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
            raise RecipeError(
                "modules: module names are letters, digits, '_', '.' and '-' (at most "
                f"{MAX_MODULE_NAME}), e.g. text_decoder; got {show(name)}"
            )
        where = f"modules.{name}"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: must be a mapping with models: or slices:")
        _check_keys(entry, MODULE_KEYS, where)
        own = entry.get("merge_method")
        if own is not None and (not isinstance(own, str) or own not in METHODS):
            valid = ", ".join(sorted(METHODS))
            raise RecipeError(f"{where}.merge_method: unknown method {show(own)}; valid: {valid}")
        m = get_method(own) if own is not None else method
        has_models, has_slices = entry.get("models") is not None, entry.get("slices") is not None
        if has_models == has_slices:
            raise RecipeError(f"{where}: give exactly one of 'models' or 'slices'")
        models = _parse_models(entry["models"], m, f"{where}.") if has_models else None
        slices = _parse_slices(entry["slices"], m, f"{where}.") if has_slices else None
        params = _parse_params(entry.get("parameters"), m, f"{where}.parameters")
        out.append(ModuleRecipe(name, m, models, slices, params))
    return tuple(out)


def _parse_models(raw: Any, method: MethodSpec, at: str = "") -> tuple[InputModel, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(
            f"'{at}models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}"
        )
    out = []
    for i, entry in enumerate(raw):
        where = f"{at}models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where}: each entry needs 'model: PATH'")
        _check_keys(entry, ("model", "parameters"), where)
        params = _parse_params(entry.get("parameters"), method, f"{where}.parameters")
        out.append(InputModel(ModelRef.parse(entry["model"], where), params))
    return tuple(out)


def _parse_slices(raw: Any, method: MethodSpec, at: str = "") -> tuple[OutputSlice, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"'{at}slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, entry in enumerate(raw):
        where = f"{at}slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list):
            raise RecipeError(f"{where}: each slice needs 'sources: [{{model, layer_range}}]'")
        _check_keys(entry, ("sources", "base_model", "parameters", "residual_weight"), where)
        if entry.get("residual_weight") is not None:
            raise RecipeError(f"{where}: residual_weight is not supported; remove it")
        sources = []
        for j, src in enumerate(entry["sources"]):
            swhere = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise RecipeError(f"{swhere}: needs 'model' and 'layer_range: [start, end]'")
            _check_keys(src, ("model", "layer_range", "parameters"), swhere)
            lr = src["layer_range"]
            if (
                not isinstance(lr, list)
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or not 0 <= lr[0] < lr[1] <= MAX_LAYER
            ):
                raise RecipeError(
                    f"{swhere}: layer_range must be [start, end] with 0 <= start < end <= "
                    f"{MAX_LAYER:,}, got {show(lr)}"
                )
            params = _parse_params(src.get("parameters"), method, f"{swhere}.parameters")
            sources.append(
                SliceSource(ModelRef.parse(src["model"], swhere), (lr[0], lr[1]), params)
            )
        if not sources:
            raise RecipeError(f"{where}: 'sources' is empty")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) != 1:
            raise RecipeError(
                f"{where}: all sources of a slice must span the same number of layers"
            )
        base = ModelRef.parse(entry["base_model"], where) if entry.get("base_model") else None
        params = _parse_params(entry.get("parameters"), method, f"{where}.parameters", True)
        out.append(OutputSlice(tuple(sources), base, params))
    return tuple(out)


def _parse_params(raw: Any, method: MethodSpec, where: str, per_model_ok: bool = True) -> Settings:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be a mapping of parameter names to values")
    valid = [p.name for p in method.params]
    out = {}
    for name, value in raw.items():
        if name == "weight" and method.param(name) is None:
            continue  # mergekit's recipes (its own tests too) give every method weights
        if method.param(name) is None:
            listing = ", ".join(valid) if valid else "none"
            raise RecipeError(
                f"{where}: unknown parameter {show(name)} for {method.name}; valid: {listing}"
            )
        out[name] = parse_setting(value, f"{where}.{name}", kind=method.param(name).kind)
    return out


def _check_keys(entry: dict, valid: tuple[str, ...], where: str) -> None:
    for key in entry:
        if key not in valid:
            raise RecipeError(f"{where}: unknown key {show(key)}; valid keys: {', '.join(valid)}")


def _parse_dtype(
    raw: Any, where: str, valid: tuple[str, ...] = DTYPES, aliases: dict = DTYPE_ALIASES
) -> str | None:
    if raw is None:
        return None
    name = aliases.get(raw, raw) if isinstance(raw, str) else raw
    if name not in valid:
        raise RecipeError(f"{where}: unknown dtype {show(raw)}; valid: {', '.join(valid)}")
    return name


def _parse_seed(raw: Any) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or abs(raw) > MAX_SEED:
        raise RecipeError(f"seed must be an integer of at most 2**63 - 1, got {show(raw)}")
    return raw


def _check_base(
    method: MethodSpec,
    base: ModelRef | None,
    slices: tuple[OutputSlice, ...] | None,
    where: str = "",
) -> None:
    if method.base == "required":
        slice_bases = [s.base_model for s in slices or ()]
        if base is None and not (slice_bases and all(slice_bases)):
            raise RecipeError(
                f"{where}{method.name} needs base_model: the model the fine-tunes started from"
            )
