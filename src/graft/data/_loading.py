"""Loading runners: Hugging Face folders (sentence-transformers layouts included) and
digits-zoo backbones, with their heads; see `graft.data.runner` for what a runner is."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from graft.data.heads import HEAD_FILE, HeadFile, check_unique_labels, load_head_file
from graft.data.labels import DataError
from graft.data.runner import (
    DEFAULT_MAX_LENGTH,
    POOLINGS,
    DigitsClassifier,
    EncoderClassifier,
    Runner,
    SequenceClassifier,
    position_limit,
)
from graft.io import open_checkpoint

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")


def load_runner(
    path: str | os.PathLike,
    *,
    head: str | os.PathLike | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
) -> Runner:
    """Load a model graft can run (module docstring).

    Args:
        path: a model folder (HF, sentence-transformers, or a digits-zoo backbone).
        head: a head file or a sequence-classification model folder (see module doc).
        pooling: feature pooling (default: the head's, the folder's, else ``mean``).
        max_length: token truncation (default: the head's, else the tokenizer's, at most 256).

    Raises:
        DataError: graft cannot run the model, the head does not fit it, or a file is missing.
        GraftIOError: a checkpoint cannot be read.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise DataError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    if max_length is not None and max_length < 1:
        raise DataError(f"--max-length must be >= 1, got {max_length}")
    p = resolve_model(path)
    weights_dir, st_pooling = _sentence_transformers_layout(p)
    with open_checkpoint(weights_dir) as ckpt:
        config = ckpt.config
        if config is None:
            raise DataError(f"{p} has no config.json; graft runs Hugging Face model folders")
        from graft.models.digits_net import ARCHITECTURE

        if ARCHITECTURE in (config.get("architectures") or []):
            return _load_digits(p, ckpt, head)
        state = {n: ckpt.get(n) for n in ckpt.names}
    check_finite(state, p)
    return _load_transformers(
        p, weights_dir, config, state, head, pooling or st_pooling, max_length
    )


def resolve_model(path: str | os.PathLike) -> Path:
    """A local model folder, or a hub id (``org/name``) found in the local Hugging Face
    cache; graft never downloads.

    Raises:
        DataError: neither exists.
    """
    p = Path(path)
    if p.exists():
        return p
    from graft.plan.models import resolve_model_path
    from graft.recipe import ModelRef

    try:
        return resolve_model_path(ModelRef(str(path)), None)
    except (ValueError, TypeError) as e:  # RecipeError: not local, not cached
        raise DataError(str(e)) from None


def _sentence_transformers_layout(path: Path) -> tuple[Path, str | None]:
    """The folder holding the transformer weights, and the pooling mode of ``1_Pooling``."""
    modules = path / "modules.json"
    if not modules.is_file():
        return path, None
    try:
        doc = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise DataError(f"cannot parse {modules}; fix or remove it") from None
    if not isinstance(doc, list):
        raise DataError(f"{modules} is not a list of modules; fix or remove it")
    weights, mode = path, None
    for entry in doc:
        if not isinstance(entry, dict):
            continue
        kind, sub = str(entry.get("type", "")), str(entry.get("path", ""))
        target = (path / sub).resolve()
        if not target.is_relative_to(path.resolve()):
            raise DataError(f"{modules} names module path {sub!r} outside the model folder")
        if kind.endswith("Transformer") and sub:
            weights = path / sub
        elif kind.endswith("Pooling"):
            mode = _st_pooling_mode(path / sub / "config.json")
    return weights, mode


def _st_pooling_mode(config: Path) -> str | None:
    if not config.is_file():
        return None
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    for key, mode in (
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_lasttoken", "last"),
        ("pooling_mode_mean_tokens", "mean"),
    ):
        if doc.get(key) is True:
            return mode
    return None


def _load_digits(path: Path, ckpt, head) -> Runner:
    from graft.models.digits_net import load_backbone

    try:
        backbone, config = load_backbone(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    check_finite(backbone.state_dict(), path)
    head_file = _head_file(path, head)
    linear = head_file.linear if head_file else None
    if linear is not None and linear.in_features != config["hidden_size"]:
        raise DataError(
            f"model {path} gives {config['hidden_size']} features but head {head_file.path} "
            f"expects {linear.in_features}; use a head trained on this model's family"
        )
    module = DigitsClassifier(backbone, linear).eval()
    names = {f"backbone.{n}": n for n, _ in backbone.named_parameters()}
    return Runner(
        path,
        "digits",
        module,
        names,
        label_names=head_file.label_names if head_file else None,
        num_classes=linear.out_features if linear is not None else None,
        num_features=config["hidden_size"],
        head_source=str(head_file.path) if head_file else "none",
        input_size=config["input_size"],
    )


def _head_file(path: Path, head) -> HeadFile | None:
    if head is not None:
        h = Path(head)
        if h.is_dir() and (h / HEAD_FILE).is_file():
            h = h / HEAD_FILE
        if h.is_dir():
            raise DataError(f"head {h} is a folder without {HEAD_FILE}; pass a head file")
        if not h.is_file():
            raise DataError(f"head {h} not found; pass a head .safetensors file")
        return load_head_file(h)
    if (path / HEAD_FILE).is_file():
        return load_head_file(path / HEAD_FILE)
    return None


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise DataError(
            "running Hugging Face models needs transformers: pip install 'graft[hf]'"
        ) from e
    transformers.logging.set_verbosity_error()
    return transformers


def _config_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's strict-dataclass errors (a config field of the wrong type, newer
    transformers) derive from plain Exception."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _build(
    config: dict, where: Path, *, classifier: bool, state: Mapping[str, torch.Tensor]
) -> nn.Module:
    """The transformers model ``config`` describes, with random weights, for the weights
    ``state``. A config whose block count is not the checkpoint's is refused (fewer blocks
    would silently leave stored ones out); the model is then built on the meta device
    first (no memory), and a config describing far more parameters than the checkpoint
    stores is refused before anything is allocated."""
    _check_depth(config, state, where)
    stored = sum(t.numel() for t in state.values() if t.is_floating_point())
    tf = _transformers()
    cfg_dict = dict(config)
    model_type = cfg_dict.pop("model_type", None)
    if not model_type:
        raise DataError(f"{where}/config.json has no model_type; graft cannot build the model")
    what = "sequence-classification model" if classifier else "model"

    def cannot(e: BaseException) -> DataError:
        return DataError(
            f"transformers cannot build a {what} from {where}/config.json "
            f"(model_type {model_type!r}): {' '.join(str(e).split())[:160]}"
        )

    errors = (ValueError, KeyError, TypeError, AttributeError, ImportError, *_config_errors())
    try:
        cfg = tf.AutoConfig.for_model(model_type, **cfg_dict)
    except errors as e:
        raise cannot(e) from None
    try:
        with torch.device("meta"):
            probe = _instantiate(tf, cfg, classifier)
    except errors as e:
        raise cannot(e) from None
    except (RuntimeError, NotImplementedError):
        probe = None  # a model that cannot be built on the meta device: no size check
    if probe is not None:
        wanted = sum(p.numel() for p in probe.parameters())
        if wanted > 2 * stored + 1_000_000:
            raise DataError(
                f"{where}/config.json describes a {what} of {wanted:,} parameters, but the "
                f"checkpoint stores {stored:,}; the config.json does not describe these weights"
            )
    try:
        return _instantiate(tf, cfg, classifier)
    except errors as e:
        raise cannot(e) from None


def _instantiate(tf, cfg, classifier: bool) -> nn.Module:
    if classifier:
        return tf.AutoModelForSequenceClassification.from_config(cfg)
    try:
        return tf.AutoModel.from_config(cfg, add_pooling_layer=False)
    except TypeError:
        return tf.AutoModel.from_config(cfg)


def _check_depth(config: dict, state: Mapping[str, torch.Tensor], where: Path) -> None:
    from graft.plan.arch import config_block_count, stack_depths

    stacks = stack_depths(state)  # from the names alone
    said = config_block_count(config)
    if len(stacks) == 1 and said is not None and said != (stored := next(iter(stacks.values()))):
        raise DataError(
            f"{where}/config.json describes {said} layers, but the checkpoint stores "
            f"{stored}; the config.json does not describe these weights"
        )


def _is_classifier_config(config: dict) -> bool:
    archs = config.get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def _load_transformers(
    path: Path,
    weights_dir: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    head,
    pooling: str | None,
    max_length: int | None,
) -> Runner:
    notes: list[str] = []
    head_file: HeadFile | None = None
    head_model: tuple[Path, dict, dict[str, torch.Tensor]] | None = None
    if head is not None:
        h = Path(head)
        if h.is_dir() and not (h / HEAD_FILE).is_file():
            head_model = _read_head_model(h)
        else:
            head_file = _head_file(path, head)
    elif _is_classifier_config(config):
        head_model = (path, config, state)
    elif (path / HEAD_FILE).is_file():
        head_file = load_head_file(path / HEAD_FILE)
    if head_file is not None:
        pooling = pooling or head_file.pooling
        max_length = max_length or head_file.max_length
    pooling = pooling or "mean"

    if head_model is not None:
        h_path, h_config, h_state = head_model
        model = _build(h_config, h_path, classifier=True, state=h_state)
        module: nn.Module = SequenceClassifier(model, pooling)
        prefix = model.base_model_prefix
        names = _load_classifier(module, model, prefix, state, h_state, path, h_path, notes)
        num_classes = int(model.config.num_labels)
        if num_classes < 2:
            raise DataError(
                f"{h_path}/config.json has num_labels {num_classes}; graft's classifiers need "
                "at least 2 classes (num_labels 1 is a regression head)"
            )
        label_names = _config_labels(model.config)
        if label_names is not None:
            check_unique_labels(label_names, f"{h_path}/config.json id2label")
        head_source = str(h_path) if h_path != path else f"{path} (its own classifier)"
        own_head = frozenset(c for m, c in names.items() if not m.startswith(f"model.{prefix}."))
        hidden = _hidden_size(model.config)
    else:
        encoder = _build(config, weights_dir, classifier=False, state=state)
        linear = head_file.linear if head_file else None
        hidden = _hidden_size(encoder.config)
        if linear is not None and hidden is not None and linear.in_features != hidden:
            raise DataError(
                f"model {path} gives {hidden} features but head {head_file.path} expects "
                f"{linear.in_features}; use a head trained on this model's family"
            )
        module = EncoderClassifier(encoder, pooling, linear)
        prefix = encoder.base_model_prefix
        names = _load_encoder(encoder, prefix, state, path, notes)
        names = {f"encoder.{m}": c for m, c in names.items()}
        num_classes = linear.out_features if linear is not None else None
        label_names = head_file.label_names if head_file else None
        head_source = str(head_file.path) if head_file else "none"
        own_head = frozenset()
    module.eval()
    tokenizer = _load_tokenizer([weights_dir, path, *([head_model[0]] if head_model else [])])
    asked = max_length
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
        ok = isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < 10**6
        max_length = min(limit, DEFAULT_MAX_LENGTH) if ok else DEFAULT_MAX_LENGTH
    positions = position_limit(config)
    if positions is not None and max_length > positions:
        if asked is not None:  # the default is capped quietly
            notes.append(f"truncating at {positions} tokens, the model's position limit")
        max_length = positions
    return Runner(
        path,
        "transformers",
        module,
        names,
        label_names=label_names,
        num_classes=num_classes,
        num_features=hidden or 0,
        head_source=head_source,
        notes=notes,
        pooling=pooling,
        max_length=max_length,
        tokenizer=tokenizer,
        image_processor=_load_image_processor(weights_dir) if tokenizer is None else None,
        prefix=prefix,
        head_names=own_head,
    )


def _read_head_model(h: Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    with open_checkpoint(h) as ckpt:
        config = ckpt.config
        if config is None or not _is_classifier_config(config):
            raise DataError(
                f"head {h} is neither a head file nor a sequence-classification model folder "
                "(its config.json names no *ForSequenceClassification architecture)"
            )
        state = {n: ckpt.get(n) for n in ckpt.names}
    check_finite(state, h)
    return h, config, state


class NonFiniteModelError(DataError):
    """A model to run holds NaN or Inf weights."""


def check_finite(tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    """A model with NaN or Inf weights gives NaN features, losses and gradients: every
    number a data command would report or write from it is meaningless, so it is refused."""
    from graft.plan.engine import all_finite

    for name, t in tensors.items():
        if not all_finite(t):
            raise NonFiniteModelError(
                f"tensor {name} of {where} holds NaN or Inf; graft cannot run a model with "
                f"non-finite weights (`graft lint {where}` lists them); fix the checkpoint"
            )


def _hidden_size(config) -> int | None:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _config_labels(config) -> tuple[str, ...] | None:
    """Label names from ``id2label`` unless they are transformers' ``LABEL_<i>`` defaults."""
    return id2label_names(getattr(config, "id2label", None) or {}, int(config.num_labels))


def id2label_names(id2label, count: int | None = None) -> tuple[str, ...] | None:
    """The names of outputs 0..count-1 (default: as many as ``id2label`` holds) from an
    ``id2label`` mapping, keys ints or their strings (config.json); None when one is
    missing or malformed, or all are transformers' ``LABEL_<i>`` placeholders."""
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
        names = tuple(by_index[i] for i in range(len(by_index) if count is None else count))
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _resolve_names(relative: list[str], prefix: str, available: set[str]) -> dict[str, str] | None:
    """Checkpoint names for base-model-relative keys: as they are, or under ``prefix.``."""
    direct = sum(k in available for k in relative)
    prefixed = sum(f"{prefix}.{k}" in available for k in relative)
    if direct == 0 and prefixed == 0:
        return None
    if direct >= prefixed:
        return {k: k for k in relative if k in available}
    return {k: f"{prefix}.{k}" for k in relative if f"{prefix}.{k}" in available}


def _load_encoder(
    encoder: nn.Module, prefix: str, state: dict[str, torch.Tensor], path: Path, notes: list[str]
) -> dict[str, str]:
    """Load ``state`` into ``encoder``; returns encoder parameter -> checkpoint name."""
    keys = list(encoder.state_dict())
    found = _resolve_names(keys, prefix, set(state))
    if found is None:
        raise DataError(
            f"{path}: no tensor matches the model its config.json describes (e.g. "
            f"{keys[0] if keys else '?'}); is the config from another model?"
        )
    _assign(encoder, {k: state[c] for k, c in found.items()}, path, notes)
    params = {n for n, _ in encoder.named_parameters()}
    unused = len(set(state) - set(found.values()))
    if unused:
        notes.append(f"{unused} tensors of {path} are not used by its encoder (e.g. a head)")
    return {k: c for k, c in found.items() if k in params}


def _load_classifier(
    module: SequenceClassifier,
    model: nn.Module,
    prefix: str,
    state: dict[str, torch.Tensor],
    head_state: dict[str, torch.Tensor],
    path: Path,
    head_path: Path,
    notes: list[str],
) -> dict[str, str]:
    """Backbone weights from ``state`` (the model), head weights from ``head_state``."""
    keys = list(model.state_dict())
    base_keys = [k[len(prefix) + 1 :] for k in keys if k.startswith(prefix + ".")]
    head_keys = [k for k in keys if not k.startswith(prefix + ".")]
    found = _resolve_names(base_keys, prefix, set(state)) or {}
    values = {f"{prefix}.{k}": state[c] for k, c in found.items()}
    missing_head = [k for k in head_keys if k not in head_state]
    if missing_head and any(k in dict(model.named_parameters()) for k in missing_head):
        raise DataError(
            f"{head_path} lacks its classifier weights (e.g. {missing_head[0]}); "
            "is it a sequence-classification checkpoint?"
        )
    values.update({k: head_state[k] for k in head_keys if k in head_state})
    _assign(model, values, path, notes)
    params = {n for n, _ in model.named_parameters()}
    names = {f"model.{prefix}.{k}": c for k, c in found.items() if f"{prefix}.{k}" in params}
    if head_path == path:  # the model's own head: its weights come from the checkpoint too
        names.update({f"model.{k}": k for k in head_keys if k in params and k in state})
    return names


def _assign(
    model: nn.Module, values: dict[str, torch.Tensor], path: Path, notes: list[str]
) -> None:
    expected = model.state_dict()
    for k, t in values.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise DataError(
                f"{path}: tensor for {k} has shape {tuple(t.shape)}, the config implies "
                f"{tuple(expected[k].shape)}; the config.json does not describe these weights"
            )
    result = model.load_state_dict(
        {k: t.to(expected[k].dtype) if t.is_floating_point() else t for k, t in values.items()},
        strict=False,
    )
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params]
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing:
        raise DataError(
            f"{path} lacks {len(missing)} weights its config needs (e.g. {missing[0]}); "
            "is the config from another model?"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.float()


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another (tied embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
            tied.add(seen[id(p)])
        seen[id(p)] = name
    return tied


def _load_tokenizer(dirs: list[Path]):
    folder = next((d for d in dirs if any((d / f).is_file() for f in _TOKENIZER_FILES)), None)
    if folder is None:
        return None
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except RecursionError:  # a hostile tokenizer.json nested thousands of levels deep
        raise DataError(
            f"cannot load the tokenizer in {folder}: its files are nested too deeply; "
            "replace them with the base model's tokenizer"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise DataError(
            f"cannot load the tokenizer in {folder}: {' '.join(str(e).split())[:160]}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _load_image_processor(folder: Path):
    if not (folder / "preprocessor_config.json").is_file():
        return None
    tf = _transformers()
    try:
        return tf.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise DataError(f"cannot load the image processor in {folder}: {str(e)[:160]}") from None
