"""Model runners: any model graft can run, turned into features, logits and (through
``module``) gradients, batch by batch.

Two families, one interface (`Runner`):

* **transformers** — any local Hugging Face folder that ``AutoModel`` or
  ``AutoModelForSequenceClassification`` builds from its ``config.json`` (weights read by
  graft's own reader: safetensors, or ``.bin`` weights-only), sentence-transformers
  folders included (``modules.json``: the Transformer module's folder, ``1_Pooling``'s
  pooling mode; the older layout with weights in ``0_Transformer/`` too). Text is
  tokenized with the model's own tokenizer, per batch, padded to the longest example and
  truncated at ``max_length``; images go through the folder's image processor.
* **digits** — graft's GraftDigitsNet backbones (the digits zoo).

Heads, in order of precedence: ``head=`` (a head file, or a sequence-classification model
folder whose classifier is run on top of *this* model's backbone — FusionBench's
"merged backbone, each task's own head"); else the model's own classifier (a
``*ForSequenceClassification`` checkpoint); else ``head.safetensors`` in the model folder;
else none (features only).

Features are the model's last hidden state pooled over the real (non-padding) tokens:
``mean`` by default (or the sentence-transformers folder's own mode), ``cls`` (first
token), ``max`` or ``last`` (last real token, for decoders). A linear head file is applied
to features pooled as its metadata says.

``names`` maps each module parameter read from the model's checkpoint to the tensor name in
that checkpoint, so statistics (Fisher, Gram) are saved under the names the merge engine
sees, and `Runner.logits` can run the module with replaced weights (`functional_call`):
what AdaMerging and in-memory searches need.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from graft.data.dataset import Dataset
from graft.data.labels import DataError

POOLINGS = ("mean", "cls", "max", "last")
DEFAULT_MAX_LENGTH = 256


# RoBERTa-style position ids start after the padding index: pad_token_id + 1 of the
# table's rows are never a position
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"})


def position_limit(config: dict) -> int | None:
    """The most tokens the model's position table holds (None: no absolute table)."""
    limit = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return None
    pad = config.get("pad_token_id")
    if config.get("model_type") in _OFFSET_POSITIONS and isinstance(pad, int) and pad >= 0:
        limit -= pad + 1
    return limit if limit >= 1 else None


@dataclass
class Runner:
    """A runnable model (see the module docstring).

    Attributes:
        path: the model folder the backbone weights come from.
        kind: ``"transformers"`` or ``"digits"``.
        module: ``module(**inputs)`` gives logits when there is a head, else features.
        names: module parameter name -> tensor name in ``path``'s checkpoint.
        label_names: the head's labels in id order (None: no head, or ids only).
        num_classes: the head's outputs (None without a head).
        num_features: width of the pooled features.
        head_source: where the head comes from, for messages.
        notes: what a user should know (unused tensors, missing pooler, ...).
    """

    path: Path
    kind: str
    module: nn.Module
    names: dict[str, str]
    label_names: tuple[str, ...] | None
    num_classes: int | None
    num_features: int
    head_source: str = "none"
    notes: list[str] = field(default_factory=list)
    pooling: str = "mean"
    max_length: int = DEFAULT_MAX_LENGTH
    tokenizer: object | None = None
    image_processor: object | None = None
    input_size: int | None = None  # digits: flattened input width
    prefix: str | None = None  # transformers' base_model_prefix ("bert", "model", ...)
    head_names: frozenset[str] = frozenset()  # checkpoint names of the model's own head
    _inv: dict[str, str] | None = field(default=None, init=False, repr=False)

    @property
    def has_head(self) -> bool:
        return self.num_classes is not None

    # -- data -------------------------------------------------------------------------

    def check(self, data: Dataset) -> None:
        """Fail early, with the fix, when ``data`` is of a kind this model cannot take
        (text for a digits model, features for a transformer, text without a tokenizer,
        inputs of the wrong width). Labels are not looked at.

        Raises:
            DataError: the data does not fit the model.
        """
        if self.kind == "digits" and data.kind not in ("array", "image"):
            raise DataError(
                f"{self.path} is a digits model; it takes arrays or images, not {data.kind} "
                f"data ({data.name})"
            )
        if self.kind == "transformers" and data.kind == "array":
            raise DataError(
                f"{self.path} is a transformers model; {data.name} holds numeric features. "
                "Give text (CSV/JSONL with a text column), input_ids, or images"
            )
        if self.kind == "transformers" and data.kind == "text" and self.tokenizer is None:
            raise DataError(
                f"{self.path} has no tokenizer files (tokenizer.json, vocab.txt...); copy the "
                "base model's tokenizer into it"
            )
        if data.kind == "tokens" and self.kind == "transformers":
            self._check_tokens(data)
        if data.kind == "array" and self.input_size is not None:
            width = math.prod(data.x.shape[1:])
            if width != self.input_size:
                raise DataError(
                    f"{self.path} takes {self.input_size} input values, {data.name} has {width} "
                    "per example; use data this model was built for"
                )

    @functools.cached_property
    def _transformer(self):
        """The transformers model inside graft's wrapper (None: not one)."""
        return next((m for m in self.module.modules() if hasattr(m, "get_input_embeddings")), None)

    @functools.cached_property
    def _token_rows(self) -> int | None:
        """Rows of the token embedding table (None: no such table)."""
        table = self._transformer.get_input_embeddings() if self._transformer else None
        return getattr(table, "num_embeddings", None)

    def _check_ids(self, largest: int, source: str, fix: str) -> None:
        """Token ids inside the embedding table (a foreign tokenizer's may not be)."""
        rows = self._token_rows
        if rows is not None and largest >= rows:
            raise DataError(
                f"{source} gives id {largest}, but {self.path} has {rows} token embeddings; {fix}"
            )

    def _check_tokens(self, data: Dataset) -> None:
        """Token ids inside the embedding table, rows no longer than the position table."""
        if self._transformer is None:
            return
        ids = data.tokens["input_ids"]
        if ids.size:
            source = f"{data.name}: input_ids"
            self._check_ids(int(ids.max()), source, "tokenize with this model's tokenizer")
        config = getattr(self._transformer, "config", None)
        limit = position_limit(config.to_dict()) if config is not None else None
        if limit is not None and ids.shape[1] > limit:
            raise DataError(
                f"{data.name}: rows of {ids.shape[1]} tokens, but {self.path} takes at most "
                f"{limit}; truncate the input_ids"
            )

    def prepare(self, data: Dataset) -> Dataset:
        """``data`` checked (`check`) and with label ids in this runner's head order.

        A head with named classes maps labels by name (integer labels none of whose names
        the head has are read as ids). A head without names (ids only) reads whole-number
        labels as the ids themselves — labels {3, 7} are classes 3 and 7, not 0 and 1 —
        and any other labels in their sorted order.

        Raises:
            DataError: data of a kind this model cannot take, or labels the head lacks.
        """
        self.check(data)
        if data.labels is None or not self.has_head:
            return data
        as_ids = _all_ints(data.label_names)
        if self.label_names is not None:
            if not set(data.label_names) & set(self.label_names) and as_ids:
                return self._as_ids(data, self.label_names)
            return data.relabel(self.label_names)
        if as_ids:
            return self._as_ids(data, tuple(str(i) for i in range(self.num_classes)))
        if data.num_classes > self.num_classes:
            raise DataError(
                f"{data.name} has {data.num_classes} classes but the head ({self.head_source}) "
                f"has {self.num_classes} outputs; evaluate with this task's head"
            )
        return data

    def _as_ids(self, data: Dataset, names: tuple[str, ...]) -> Dataset:
        """Whole-number labels read as the head's output indices."""
        ids = np.array([int(n) for n in data.label_names], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.num_classes:
            raise DataError(
                f"{data.name} has label {int(ids.max() if ids.max() >= 0 else ids.min())}, "
                f"outside the head's {self.num_classes} outputs ({self.head_source}); "
                "evaluate with this task's head"
            )
        return _with_labels(data, ids[data.labels], names)

    def inputs(self, data: Dataset, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The model inputs of examples ``start:stop``."""
        if self.kind == "digits":
            return {"x": torch.from_numpy(self._arrays(data, start, stop))}
        if data.kind == "text":
            pairs = data.pairs[start:stop] if data.pairs is not None else None
            enc = self.tokenizer(
                data.texts[start:stop],
                pairs,
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            if enc["input_ids"].numel():
                self._check_ids(
                    int(enc["input_ids"].max()), "the tokenizer",
                    "use the tokenizer the model was trained with",
                )  # fmt: skip
            return dict(enc)
        if data.kind == "tokens":
            return {k: torch.from_numpy(v[start:stop]) for k, v in data.tokens.items()}
        if data.kind == "image":
            if self.image_processor is None:
                raise DataError(
                    f"{self.path} has no image processor (preprocessor_config.json); "
                    "images need one"
                )
            from graft.io._tables import read_image

            images = [read_image(p, mode="RGB") for p in data.images[start:stop]]
            out = self.image_processor(images=images, return_tensors="pt", do_rescale=False)
            return {"pixel_values": out["pixel_values"]}
        raise DataError(f"{self.path} cannot take {data.kind} data ({data.name})")

    def _arrays(self, data: Dataset, start: int, stop: int) -> np.ndarray:
        if data.x is not None:
            return data.x[start:stop]
        from graft.io._tables import read_image

        side = math.isqrt(self.input_size or 0)
        if side * side != self.input_size:
            raise DataError(f"{self.path} does not take square images ({self.input_size} inputs)")
        return np.stack(
            [read_image(p, mode="L", size=(side, side)) for p in data.images[start:stop]]
        )[:, None]

    def batches(
        self, data: Dataset, batch_size: int, *, order: np.ndarray | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """``(inputs, labels or None)`` per batch, in order (or in ``order``)."""
        if order is not None:
            data = data.subset(order)
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            labels = None if data.labels is None else torch.from_numpy(data.labels[start:stop])
            yield self.inputs(data, start, stop), labels

    # -- compute ----------------------------------------------------------------------

    def logits(
        self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The head's logits (B, C); ``params`` replaces weights by checkpoint name."""
        if not self.has_head:
            raise DataError(
                f"{self.path} has no classification head; pass --head (a head file, or a "
                "sequence-classification model folder)"
            )
        return self._call(inputs, params)

    def features(
        self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Pooled features (B, D), without the head."""
        return self._call(inputs, params, method="features")

    def _call(self, inputs, params, method: str = "forward") -> torch.Tensor:
        out_fn = getattr(self.module, method)
        if not params:
            return _to_tensor(out_fn(**inputs))
        inverse = self._inverse()
        mapped = {inverse[n]: t for n, t in params.items() if n in inverse}
        if method == "forward":
            return _to_tensor(functional_call(self.module, mapped, (), dict(inputs), strict=False))
        view = _FeaturesView(self.module)
        mapped = {f"m.{k}": t for k, t in mapped.items()}
        return _to_tensor(functional_call(view, mapped, (), dict(inputs), strict=False))

    def _inverse(self) -> dict[str, str]:
        if self._inv is None:
            self._inv = {c: m for m, c in self.names.items()}
        return self._inv

    def state(self) -> dict[str, torch.Tensor]:
        """The checkpoint-named parameters as loaded (detached)."""
        params = dict(self.module.named_parameters())
        return {c: params[m].detach() for m, c in self.names.items()}

    def bind(
        self, state: Mapping[str, torch.Tensor], *, where: str = "the merged model"
    ) -> dict[str, torch.Tensor]:
        """The weights ``state`` gives this runner, keyed by the runner's checkpoint names,
        for ``logits(inputs, params=...)``.

        ``state`` is named like a checkpoint of the same family (a merge's output); each
        name is looked up as it is, without the base-model prefix (``bert.``) or with it.
        The model's own head may be absent from ``state`` (it then stays as loaded).

        Raises:
            DataError: a backbone weight is missing from ``state``, or has another shape.
        """
        out: dict[str, torch.Tensor] = {}
        params = dict(self.module.named_parameters())
        for module_name, name in self.names.items():
            t = _lookup(state, name, self.prefix)
            if t is None:
                if name in self.head_names:
                    continue
                raise DataError(
                    f"{where} has no tensor {name} (or its base-model form) that {self.path} "
                    "runs; evaluate merges of this model's family"
                )
            if tuple(t.shape) != tuple(params[module_name].shape):
                raise DataError(
                    f"{where}: {name} has shape {tuple(t.shape)}, {self.path} needs "
                    f"{tuple(params[module_name].shape)}"
                )
            out[name] = t.float() if t.is_floating_point() else t
        return out


def _lookup(state: Mapping[str, torch.Tensor], name: str, prefix: str | None):
    if name in state:
        return state[name]
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in state:
            return state[name[len(prefix) + 1 :]]
        if f"{prefix}.{name}" in state:
            return state[f"{prefix}.{name}"]
    return None


class _FeaturesView(nn.Module):
    """``module.features`` as a module's ``forward``, so `functional_call` can run it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, **inputs) -> torch.Tensor:
        return self.m.features(**inputs)


def _to_tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _all_ints(names) -> bool:
    try:
        [int(n) for n in names]
    except ValueError:
        return False
    return True


def _with_labels(data: Dataset, labels: np.ndarray, names) -> Dataset:
    from dataclasses import replace

    return replace(data, labels=labels, label_names=tuple(names))


# --- modules ---------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Pool (B, L, D) token features over real tokens into (B, D).

    Args:
        hidden: last hidden states.
        mask: attention mask (B, L), 1 for real tokens; None means all real.
        mode: ``mean``, ``cls`` (first token), ``max`` or ``last`` (last real token).
    """
    if hidden.dim() == 2:
        return hidden
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    if mode == "last":
        last = mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    raise DataError(f"unknown pooling {mode!r}; valid: {', '.join(POOLINGS)}")


class EncoderClassifier(nn.Module):
    """An encoder (``AutoModel``), pooling and an optional linear head."""

    def __init__(self, encoder: nn.Module, pooling: str, head: nn.Linear | None):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = head

    def features(self, **inputs) -> torch.Tensor:
        out = self.encoder(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, inputs.get("attention_mask"), self.pooling)

    def forward(self, **inputs) -> torch.Tensor:
        f = self.features(**inputs)
        return f if self.head is None else self.head(f)


class SequenceClassifier(nn.Module):
    """A ``*ForSequenceClassification`` model; ``features`` pools its base model's output."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def features(self, **inputs) -> torch.Tensor:
        out = self.model.base_model(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, inputs.get("attention_mask"), self.pooling)

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).logits


class DigitsClassifier(nn.Module):
    """A GraftDigitsNet backbone and an optional linear head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return f if self.head is None else self.head(f)
