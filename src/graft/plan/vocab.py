"""The output vocabulary of a recipe with ``tokenizer_source`` or a ``tokenizer:`` block,
and how each input's embedding and head rows are mapped onto it (mergekit 0.1.5's
``BuildTokenizer`` + ``PermutedVocabulary``).

Conventions, mergekit's unless marked *graft*:

* The reference tokenizer is the base model's, else the first model's (*graft*: recipe
  order; mergekit's order of its model set varies from run to run).
* ``base``: the output vocabulary is the reference tokenizer's. A model path: that
  model's tokenizer. ``union``: the reference tokenizer plus, added as new tokens (with
  transformers' ``add_tokens``, as mergekit), every token of the other models it lacks:
  ordinary tokens first, in model order, then added/special tokens (first settings win).
  *graft*: each model's tokens in id order, so the new ids are reproducible; mergekit
  takes them in the order of a hash map. Tokens a model's embedding has no row for (id
  >= its ``vocab_size``) are ignored. Tokens named under ``tokenizer.tokens`` are added
  when missing.
* Every tensor with a vocabulary axis (embeddings, output head) is rebuilt per input
  model: row ``i`` of the output vocabulary is the model's own row for that token. A
  model that lacks the token, or every model for a ``force``d token, gets the token's
  default row: the configured ``source`` if any; else, among this tensor's inputs, the
  only model that has it; else the base's row when the base has it; else the mean of the
  rows of the models that have it; a zero row when none has it.
* ``pad_to_multiple_of``: rows up to the next multiple hold the mean of the model's
  real rows (as suggested by Hewitt, "Initializing new word embeddings"), and the
  output config's ``vocab_size`` is the padded count; without it, the count of tokens.
  So an input whose embedding was padded (more rows than tokens) loses those rows, as in
  mergekit.
* The merge method then sees aligned tensors and merges them as usual.
* *graft*: a model folder without tokenizer files is taken to share the reference
  tokenizer (mergekit: the same, with a warning) and a note says so; a ``tokens:`` entry
  without ``source`` follows the default rule (mergekit fails on it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft.io import has_tokenizer, load_tokenizer
from graft.plan.arch import is_vocab_tensor
from graft.recipe import ModelRef
from graft.recipe._settings import RecipeError
from graft.recipe._tokens import TokenizerSpec, TokenSource

ZERO, AVERAGE = -1, -2  # default-row kinds besides "copy input i's row"


class VocabError(RecipeError):
    """The recipe's tokenizer settings do not fit the models' tokenizers."""


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors
class RowMap:
    """How the rows of one vocabulary tensor are built for a set of input models.

    Attributes:
        models: the inputs, in the order the tensors are given to `align_rows`.
        rows: output rows (tokens, then padding).
        size: tokens in the output vocabulary.
        own: per model, the row of its tensor that each output token takes, or -1 where
            the token takes the default row instead (missing or forced).
        avg_rows: output rows whose default is the mean over the models that have them.
        avg_from: per model, its row for each of ``avg_rows`` (-1: it lacks the token).
        donors: (model position, output rows, that model's rows) defaults copied from a
            model.
    """

    models: tuple[ModelRef, ...]
    rows: int
    size: int
    own: tuple[torch.Tensor, ...]
    avg_rows: torch.Tensor
    avg_from: tuple[torch.Tensor, ...]
    donors: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]


def align_rows(tensors: Sequence[torch.Tensor], rmap: RowMap) -> list[torch.Tensor]:
    """Rebuild each model's vocabulary tensor on the output vocabulary (dim 0).

    Args:
        tensors: one per ``rmap.models``, rows = that model's vocabulary.
        rmap: from `Vocab.row_map`.

    Returns:
        One tensor per model with ``rmap.rows`` rows, other dimensions unchanged.
    """
    like = tensors[0]
    dev = like.device
    tail = tuple(like.shape[1:])
    default = like.new_zeros((rmap.size, *tail))
    if rmap.avg_rows.numel():
        total = like.new_zeros((rmap.avg_rows.numel(), *tail))
        count = like.new_zeros((rmap.avg_rows.numel(),))
        for t, src in zip(tensors, rmap.avg_from, strict=True):
            src = src.to(dev)
            has = src >= 0
            total[has] += t[src[has]]
            count += has.to(count.dtype)
        shape = (-1,) + (1,) * len(tail)
        default[rmap.avg_rows.to(dev)] = total / count.reshape(shape)
    for pos, out_rows, src_rows in rmap.donors:
        default[out_rows.to(dev)] = tensors[pos][src_rows.to(dev)]
    result = []
    for t, own in zip(tensors, rmap.own, strict=True):
        own = own.to(dev)
        has = own >= 0
        new = t.new_empty((rmap.rows, *tail))
        new[: rmap.size] = torch.where(
            has.reshape((-1,) + (1,) * len(tail)), t[own.clamp(min=0)], default
        )
        if rmap.rows > rmap.size:
            new[rmap.size :] = new[: rmap.size].mean(dim=0)
        result.append(new)
    return result


@dataclass
class Vocab:
    """The output vocabulary and each referenced model's token -> row mapping.

    Attributes:
        tokenizer: the transformers tokenizer to save, or None to copy ``copy_from``'s
            tokenizer files unchanged (nothing was added to it).
        copy_from: the model whose tokenizer files the output gets when ``tokenizer`` is
            None.
        copy_root: that model's folder.
        tokens: output token -> id.
        rows: output rows (``len(tokens)`` padded to ``pad_to_multiple_of``).
        perms: per model: output id -> that model's row, -1 where it lacks the token.
        vocabs: per model, its own token -> id (for ``model_token`` sources).
        notes: what a dry run should say.
    """

    spec: TokenizerSpec
    base: ModelRef
    tokenizer: object | None
    copy_from: ModelRef | None
    copy_root: Path | None
    tokens: dict[str, int]
    rows: int
    perms: dict[ModelRef, torch.Tensor]
    vocabs: dict[ModelRef, dict[str, int]]
    notes: list[str] = field(default_factory=list)
    _maps: dict[tuple[ModelRef, ...], RowMap] = field(default_factory=dict)

    def row_map(
        self, models: Sequence[ModelRef], base: ModelRef | None, rows_of: Mapping[ModelRef, int]
    ) -> RowMap:
        """The row mapping for a tensor whose inputs are ``models`` (base included), each
        holding ``rows_of[m]`` rows; cached per set of models."""
        key = tuple(models)
        if key not in self._maps:
            self._maps[key] = self._build(key, base, rows_of)
        return self._maps[key]

    def _build(
        self, models: tuple[ModelRef, ...], base: ModelRef | None, rows_of: Mapping[ModelRef, int]
    ) -> RowMap:
        for m in models:
            bad = self.perms[m] >= rows_of[m]
            if bool(bad.any()):
                raise VocabError(
                    f"model {m}'s tokenizer has tokens up to id {int(self.perms[m].max())} but "
                    f"its vocabulary tensors have {rows_of[m]} rows; fix its tokenizer or config"
                )
        perms = torch.stack([self.perms[m] for m in models])  # (models, size)
        present = perms >= 0
        forced = torch.zeros(len(self.tokens), dtype=torch.bool)
        avg: list[int] = []
        donors: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in range(len(models))}
        configured = dict(self.spec.tokens)
        for token, tid in self.tokens.items():
            spec = configured.get(token)
            if spec is not None and spec.force:
                forced[tid] = True
            elif bool(present[:, tid].all()):
                continue
            if spec is not None and spec.source is not None:
                pos, row = self._source_row(spec.source, token, tid, models, rows_of)
            else:
                pos, row = self._default_row(tid, models, base, perms, present)
            if pos == AVERAGE:
                avg.append(tid)
            elif pos != ZERO:  # a zero row needs nothing: the defaults start at zero
                donors[pos][0].append(tid)
                donors[pos][1].append(row)
        own = tuple(torch.where(forced, -1, perms[i]) for i in range(len(models)))
        avg_rows = torch.tensor(avg, dtype=torch.long)
        return RowMap(
            models=models,
            rows=self.rows,
            size=len(self.tokens),
            own=own,
            avg_rows=avg_rows,
            avg_from=tuple(perms[i][avg_rows] for i in range(len(models))),
            donors=tuple(
                (i, torch.tensor(o, dtype=torch.long), torch.tensor(s, dtype=torch.long))
                for i, (o, s) in donors.items()
                if o
            ),
        )

    @staticmethod
    def _default_row(
        tid: int,
        models: tuple[ModelRef, ...],
        base: ModelRef | None,
        perms: torch.Tensor,
        present: torch.Tensor,
    ) -> tuple[int, int]:
        """mergekit's default for a token some input lacks: the only model that has it,
        else the base's row, else the average; zero when no input has it."""
        have = [i for i in range(len(models)) if present[i, tid]]
        if len(have) == 1:
            return have[0], int(perms[have[0], tid])
        if not have:
            return ZERO, -1
        if base in models and bool(present[models.index(base), tid]):
            i = models.index(base)
            return i, int(perms[i, tid])
        return AVERAGE, -1

    def _source_row(
        self,
        source: TokenSource,
        token: str,
        tid: int,
        models: tuple[ModelRef, ...],
        rows_of: Mapping[ModelRef, int],
    ) -> tuple[int, int]:
        """(input position, row) of a configured source; (ZERO, -1) for a zero row."""
        if source.kind == "zero":
            return ZERO, -1
        model = source.model
        if model not in models:
            raise VocabError(
                f"token {token!r} takes its embedding from model {model}, which is not an "
                f"input of this tensor ({', '.join(map(str, models))})"
            )
        pos = models.index(model)
        if source.kind == "model":
            row = int(self.perms[model][tid])
            if row < 0:
                raise VocabError(f"token {token!r} is not in model {model}'s vocabulary")
            return pos, row
        if source.token is not None:
            row = self.vocabs[model].get(source.token, -1)
            if row < 0:
                raise VocabError(
                    f"token {token!r}: source token {source.token!r} is not in model {model}"
                )
        else:
            row = source.token_id  # type: ignore[assignment]
        if not 0 <= row < rows_of[model]:
            raise VocabError(
                f"token {token!r}: source row {row} is outside model {model}'s "
                f"{rows_of[model]} vocabulary rows"
            )
        return pos, row


def plan_vocab(
    spec: TokenizerSpec,
    base: ModelRef,
    models: Sequence[ModelRef],
    ckpts: Mapping[ModelRef, object],
    source: object | Path | None,
) -> Vocab:
    """Load the tokenizers the recipe needs and build the output vocabulary.

    Args:
        spec: the recipe's tokenizer settings.
        base: the reference model (base, else first).
        models: the referenced models.
        ckpts: their opened checkpoints (or dry-run stand-ins).
        source: for ``source: MODEL``, that model's checkpoint or folder.

    Raises:
        VocabError: the reference or source model has no tokenizer, or the mapping fails.
    """
    tokenizers = {m: _tokenizer_of(ckpts[m]) for m in models}
    if tokenizers[base] is None:
        raise VocabError(
            f"tokenizer settings need the tokenizer of {base} (the base, else the first "
            f"model), but {_root(ckpts[base]) or base} has no tokenizer files"
        )
    source_tok, copy_root = None, _root(ckpts[base])
    if isinstance(spec.source, ModelRef):
        source_tok = _tokenizer_of(source)
        copy_root = _root(source)
        if source_tok is None:
            raise VocabError(
                f"tokenizer source {spec.source} has no tokenizer files ({copy_root}); "
                "point it at a folder with a tokenizer"
            )
    sizes = {m: _vocab_rows(ckpts[m], len(tokenizers[m] or tokenizers[base])) for m in models}
    vocab = build_vocab(
        spec, base, models, tokenizers, sizes, source_tok, _tokenizer_of(ckpts[base])
    )
    vocab.copy_root = copy_root
    return vocab


def _root(thing) -> Path | None:
    return thing if isinstance(thing, Path) else getattr(thing, "root", None)


def _tokenizer_of(thing):
    planned = getattr(thing, "planned_tokenizer", None)  # a dry-run stand-in's
    if planned is not None:
        return copy.deepcopy(planned)
    root = _root(thing)
    return load_tokenizer(root) if has_tokenizer(root) else None


def _vocab_rows(ckpt, tokens: int) -> int:
    """A model's vocabulary rows: config ``vocab_size``, else its embedding's rows."""
    config = getattr(ckpt, "config", None) or {}
    size = config.get("vocab_size")
    if not isinstance(size, int) and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    for name in ckpt.names:
        if is_vocab_tensor(name):
            return int(ckpt.info(name).shape[0])
    return tokens


def build_vocab(
    spec: TokenizerSpec,
    base: ModelRef,
    models: Sequence[ModelRef],
    tokenizers: Mapping[ModelRef, object | None],
    sizes: Mapping[ModelRef, int],
    source_tokenizer: object | None,
    fresh_base: object,
) -> Vocab:
    """Build the output vocabulary (see the module docstring).

    Args:
        spec: the recipe's tokenizer settings.
        base: the reference model (base, else first).
        models: every referenced model, base first.
        tokenizers: per model, its tokenizer (None: it has none; the base's is used).
        sizes: per model, its vocabulary rows (``vocab_size``).
        source_tokenizer: the tokenizer of ``spec.source`` when that is a model.
        fresh_base: a second copy of the base tokenizer, which union/base extend.
    """
    notes: list[str] = []
    ref_tok = tokenizers[base]
    vocabs: dict[ModelRef, dict[str, int]] = {}
    for m in models:
        tok = tokenizers.get(m)
        if tok is None:
            notes.append(f"model {m} has no tokenizer files; taken to share {base}'s tokenizer")
            tok = ref_tok
        vocabs[m] = dict(tok.get_vocab())
    if isinstance(spec.source, ModelRef):
        out_tok, copy_from = source_tokenizer, spec.source
    else:
        out_tok, copy_from = fresh_base, base
    added = 0
    if spec.source == "union":
        added += _add_union(out_tok, base, models, tokenizers, sizes, ref_tok)
    existing = set(out_tok.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            out_tok.add_tokens(token)
            existing.add(token)
            added += 1
    tokens = dict(sorted(out_tok.get_vocab().items(), key=lambda kv: kv[1]))
    ids = list(tokens.values())
    if ids != list(range(len(ids))):
        raise VocabError(
            "the output tokenizer's token ids are not 0..N-1 without gaps; graft (like "
            "mergekit) cannot map embedding rows onto it"
        )
    pad = spec.pad_to_multiple_of
    rows = len(tokens) if not pad else -(-len(tokens) // pad) * pad
    perms = {}
    for m in models:
        own = vocabs[m]
        perm = torch.full((len(tokens),), -1, dtype=torch.long)
        for token, tid in tokens.items():
            old = own.get(token)
            if old is not None and old < sizes[m]:
                perm[tid] = old
        perms[m] = perm
    if added:
        notes.append(f"output vocabulary: {len(tokens)} tokens ({added} added), {rows} rows")
    else:
        notes.append(f"output vocabulary: {copy_from}'s {len(tokens)} tokens, {rows} rows")
    return Vocab(
        spec=spec,
        base=base,
        tokenizer=out_tok if added else None,
        copy_from=copy_from,
        copy_root=None,
        tokens=tokens,
        rows=rows,
        perms=perms,
        vocabs=vocabs,
        notes=notes,
    )


def _add_union(out_tok, base, models, tokenizers, sizes, ref_tok) -> int:
    """Add to ``out_tok`` every token of ``models`` it lacks; returns how many."""
    plain: dict[str, None] = {}
    special: dict[str, object] = {}
    for m in [base, *[x for x in models if x != base]]:
        tok = tokenizers.get(m) or ref_tok
        decoder = tok.added_tokens_decoder
        added = {info.content for info in decoder.values()}
        for token, tid in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if tid < sizes[m] and token not in added:
                plain.setdefault(token, None)
        for tid, info in sorted(decoder.items()):
            if tid < sizes[m]:
                special.setdefault(info.content, info)
    have = set(out_tok.get_vocab())
    before = len(have)
    for token in plain:
        if token not in have and token not in special:
            out_tok.add_tokens(token)
    for token, info in special.items():
        if token not in have:
            out_tok.add_tokens(info)
    return len(out_tok.get_vocab()) - before
