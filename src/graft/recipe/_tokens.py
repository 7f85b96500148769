"""The recipe keys about the output vocabulary: ``tokenizer_source``, the ``tokenizer:``
block and ``chat_template`` (mergekit 0.1.5's `TokenizerConfig` and chat templates).

``tokenizer_source: union | base | MODEL`` is shorthand for ``tokenizer: {source: ...}``.
The block adds ``tokens:`` (per token: where its embedding comes from, and ``force`` to
use that source even for models that have the token) and ``pad_to_multiple_of`` (the
output vocabulary is padded with rows; see `graft.plan.vocab`).

A token's ``source`` is one of (mergekit's forms):

* a model reference string: that model's row for the same token;
* ``{kind: model_token, model: M, token: T}`` or ``{..., token_id: N}``: model M's row
  for token T (or row N) of M's own vocabulary;
* ``{kind: zero}``: a zero row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from graft.recipe._settings import RecipeError, show

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
MAX_PAD_MULTIPLE = 1 << 16
MAX_TOKENS = 100_000
# mergekit treats a short chat_template without '{' as a template name; anything else
# shorter than this is refused as a typo.
MIN_TEMPLATE_CHARS = 20


@dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding row comes from.

    Attributes:
        kind: ``"model"`` (that model's row for the same token), ``"model_token"`` (a
            given token or row of that model) or ``"zero"``.
        model: the model (``"model"``, ``"model_token"``).
        token: the token of ``model``'s vocabulary (``"model_token"``).
        token_id: or its row (``"model_token"``).
    """

    kind: str
    model: Any = None  # ModelRef
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSpec:
    """One entry of ``tokenizer.tokens``: a source (None: the default rule) and force."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary.

    Attributes:
        source: ``"union"``, ``"base"`` or a model reference (a ModelRef).
        tokens: token string -> `TokenSpec`; tokens not in the source vocabulary are added.
        pad_to_multiple_of: pad the output rows to a multiple of this, or None.
    """

    source: Any  # "union" | "base" | ModelRef
    tokens: Mapping[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


ParseRef = Callable[[Any, str], Any]


def parse_tokenizer(source: Any, block: Any, parse_ref: ParseRef) -> TokenizerSpec | None:
    """``tokenizer_source`` or the ``tokenizer:`` block as a `TokenizerSpec` (None: neither)."""
    if source is not None:
        return TokenizerSpec(_parse_source(source, "tokenizer_source", parse_ref))
    if block is None:
        return None
    if not isinstance(block, dict):
        raise RecipeError("tokenizer: must be a mapping with source, tokens, pad_to_multiple_of")
    for key in block:
        if key not in TOKENIZER_KEYS:
            raise RecipeError(
                f"tokenizer: unknown key {show(key)}; valid keys: {', '.join(TOKENIZER_KEYS)}"
            )
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (
        not isinstance(pad, int) or isinstance(pad, bool) or not 1 <= pad <= MAX_PAD_MULTIPLE
    ):
        raise RecipeError(
            f"tokenizer.pad_to_multiple_of must be an integer from 1 to {MAX_PAD_MULTIPLE}, "
            f"got {show(pad)}"
        )
    # mergekit's default source is the union of the inputs' vocabularies.
    spec_source = _parse_source(block.get("source", "union"), "tokenizer.source", parse_ref)
    tokens = _parse_tokens(block.get("tokens"), parse_ref)
    return TokenizerSpec(spec_source, tokens, pad)


def _parse_source(raw: Any, where: str, parse_ref: ParseRef) -> Any:
    if raw in ("union", "base"):
        return raw
    if not isinstance(raw, str):
        raise RecipeError(f"{where} must be 'union', 'base' or a model path, got {show(raw)}")
    return parse_ref(raw, where)


def _parse_tokens(raw: Any, parse_ref: ParseRef) -> dict[str, TokenSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_TOKENS:
        raise RecipeError(
            f"tokenizer.tokens must map token strings to {{source, force}} (at most {MAX_TOKENS:,})"
        )
    out = {}
    for token, entry in raw.items():
        where = f"tokenizer.tokens[{show(token)}]"
        if not isinstance(token, str) or not token:
            raise RecipeError(f"{where}: tokens must be non-empty strings")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise RecipeError(f"{where}: takes keys 'source' and 'force'")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force must be true or false, got {show(force)}")
        source = entry.get("source")
        parsed = None if source is None else _parse_token_source(source, where, parse_ref)
        if force and parsed is None:
            raise RecipeError(f"{where}: force: true needs a source to take the row from")
        out[token] = TokenSpec(parsed, force)
    return out


def _parse_token_source(raw: Any, where: str, parse_ref: ParseRef) -> TokenSource:
    if isinstance(raw, str):
        return TokenSource("model", parse_ref(raw, f"{where}.source"))
    if not isinstance(raw, dict) or raw.get("kind") not in ("model_token", "zero"):
        raise RecipeError(
            f"{where}.source: a model path, {{kind: model_token, model, token or token_id}} "
            "or {kind: zero}"
        )
    if raw["kind"] == "zero":
        if set(raw) != {"kind"}:
            raise RecipeError(f"{where}.source: {{kind: zero}} takes no other keys")
        return TokenSource("zero")
    if set(raw) - {"kind", "model", "token", "token_id"} or "model" not in raw:
        raise RecipeError(f"{where}.source: model_token takes model and token or token_id")
    token, token_id = raw.get("token"), raw.get("token_id")
    if (token is None) == (token_id is None):
        raise RecipeError(f"{where}.source: give exactly one of token or token_id")
    if token is not None and not isinstance(token, str):
        raise RecipeError(f"{where}.source.token must be a string, got {show(token)}")
    if token_id is not None and (
        not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0
    ):
        raise RecipeError(f"{where}.source.token_id must be an integer >= 0, got {show(token_id)}")
    model = parse_ref(raw["model"], f"{where}.source.model")
    return TokenSource("model_token", model, token, token_id)


def parse_chat_template(raw: Any) -> str | None:
    """``chat_template``: ``auto``, a template name graft ships (`graft.recipe.templates`)
    expanded to its text, or a Jinja template; the rules are mergekit's."""
    from graft.recipe.templates import CHAT_TEMPLATES

    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise RecipeError(f"chat_template must be a template name or Jinja text, got {show(raw)}")
    if raw == "auto":
        return raw
    if raw in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[raw]
    if len(raw) < MIN_TEMPLATE_CHARS or "{" not in raw:
        names = ", ".join(["auto", *CHAT_TEMPLATES])
        raise RecipeError(
            f"chat_template {show(raw)} is neither a known name ({names}) nor a Jinja template"
        )
    _check_jinja(raw)
    return raw


def _check_jinja(text: str) -> None:
    """A template transformers could not compile would be written into the output and fail
    at the first ``apply_chat_template``; it fails here (with jinja2, which transformers'
    chat templates need, installed); a private helper of transformers' that moved is
    skipped rather than guessed at."""
    try:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return
    try:
        _compile_jinja_template(text)  # transformers' own environment and extensions
    except jinja2.TemplateSyntaxError as e:
        message = " ".join(str(e.message or e).split())[:160]
        raise RecipeError(
            f"chat_template is not a valid Jinja template (line {e.lineno}: {message}); "
            "fix it or name a known template"
        ) from None
