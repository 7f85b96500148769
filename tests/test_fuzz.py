"""Property-based fuzzing of the two parsers that take files from strangers: the safetensors
header parser and the recipe loader. Whatever the input, they either succeed or raise
graft's own error (`GraftIOError` / `RecipeError`) with a one-line message; valid inputs
still parse to what was written.

Bounded for CI: each property runs a fixed (derandomized) set of examples. Set
``GRAFT_FUZZ_RANDOM=1`` for a fresh random search and ``GRAFT_FUZZ_EXAMPLES=N`` for more.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from graft.io import GraftIOError, open_checkpoint, read_model_card  # noqa: E402
from graft.io._format import CODE_OF_DTYPE, DTYPE_OF_CODE, encode_header, parse_header  # noqa: E402
from graft.recipe import RecipeError, parse_recipe  # noqa: E402
from graft.recipe.config import TOP_KEYS  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "120")),
    deadline=None,
    database=None,
    derandomize=not os.environ.get("GRAFT_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_DIR = Path(tempfile.mkdtemp(prefix="graft-fuzz-"))  # one file rewritten per example
atexit.register(shutil.rmtree, _DIR, True)


def _file(raw: bytes) -> Path:
    path = _DIR / "fuzz.safetensors"
    path.write_bytes(raw)
    return path


def _header_file(header: bytes, data: bytes = b"") -> Path:
    return _file(struct.pack("<Q", len(header)) + header + data)


def _parse_or_graft_error(path: Path):
    """parse_header, and on success read every tensor; only GraftIOError may come out."""
    try:
        header = parse_header(path)
        with open_checkpoint(path) as ckpt:
            for name in ckpt.names:
                t = ckpt.get(name)
                assert tuple(t.shape) == ckpt.info(name).shape
        return header
    except GraftIOError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return None


# --- strategies ---------------------------------------------------------------------------

_ints = st.one_of(
    st.integers(-3, 64), st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, 2**64])
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_codes = st.sampled_from(sorted(DTYPE_OF_CODE))
_field = {
    "dtype": st.one_of(_codes, _json),
    "shape": st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(_ints, max_size=3), _json),
    "data_offsets": st.one_of(st.lists(st.integers(0, 64), min_size=2, max_size=2), _json),
}
_entry = st.fixed_dictionaries({}, optional=_field) | _json
_names = st.one_of(st.text(max_size=10), st.just("__metadata__"))
_metadata = st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), _json)


@st.composite
def _valid_tensors(draw) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        dtype = DTYPE_OF_CODE[draw(_codes)]
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        n = math.prod(shape) * dtype.itemsize
        raw = torch.tensor(list(draw(st.binary(min_size=n, max_size=n))), dtype=torch.uint8)
        out[name] = raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    entries, data, pos = [], b"", 0
    for name, t in tensors.items():
        raw = _bytes(t)
        entries.append((name, t.dtype, tuple(t.shape), pos, pos + len(raw)))
        data, pos = data + raw, pos + len(raw)
    return encode_header(entries, metadata) + data


# --- safetensors headers ------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_header_parser_on_arbitrary_bytes(raw):
    _parse_or_graft_error(_file(raw))


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=32))
def test_header_parser_on_arbitrary_header_bytes(header, data):
    _parse_or_graft_error(_header_file(header, data))


@FUZZ
@given(
    st.dictionaries(_names, _entry, max_size=4),
    st.one_of(st.none(), _metadata),
    st.binary(max_size=64),
)
def test_header_parser_on_json_with_random_types(entries, metadata, data):
    doc = dict(entries)
    if metadata is not None:
        doc["__metadata__"] = metadata
    _parse_or_graft_error(_header_file(json.dumps(doc).encode(), data))


@FUZZ
@given(
    _valid_tensors(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-8, 8),
)
def test_header_parser_on_mutated_valid_files(tensors, flips, resize):
    raw = bytearray(_encode(tensors, {"k": "v"}))
    for pos, value in flips:
        raw[pos % len(raw)] = value
    raw = raw[: len(raw) + resize] if resize < 0 else raw + b"\0" * resize
    _parse_or_graft_error(_file(bytes(raw)))


@FUZZ
@given(_valid_tensors(), st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
def test_valid_files_parse_to_what_was_written(tensors, metadata):
    for raw in (_encode(tensors, metadata), None):
        if raw is None:  # and the reference writer's bytes
            save_file(tensors, _DIR / "ref.safetensors", metadata=metadata or None)
            path = _DIR / "ref.safetensors"
        else:
            path = _file(raw)
        header = parse_header(path)
        assert {t.info.name: t.info.shape for t in header.tensors} == {
            n: tuple(t.shape) for n, t in tensors.items()
        }
        assert header.metadata == metadata
        with open_checkpoint(path) as ckpt:
            for name, t in tensors.items():
                got = ckpt.get(name)
                assert got.dtype == t.dtype and CODE_OF_DTYPE[got.dtype]
                assert _bytes(got) == _bytes(t)


@FUZZ
@given(st.text(max_size=300))
def test_card_reader_on_arbitrary_front_matter(text):
    card = _DIR / "README.md"
    card.write_text(f"---\n{text}\n---\n", encoding="utf-8", errors="surrogatepass")
    try:
        meta = read_model_card(card)
    except GraftIOError as e:
        assert "\n" not in str(e) and "README.md" in str(e)
    else:
        assert meta is None or isinstance(meta, dict)


# --- recipes ------------------------------------------------------------------------------


def _parse_or_recipe_error(text: str):
    try:
        return parse_recipe(text)
    except RecipeError as e:
        assert "\n" not in str(e), str(e)
        return None


_yaml_keys = st.one_of(st.sampled_from(TOP_KEYS), st.text(max_size=8), st.integers(-2, 2))
_yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["linear", "ties", "slerp", "task_arithmetic", "a", "b", "1e308", ".nan"]),
)
_yaml_values = st.recursive(
    _yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    [
                        "model",
                        "parameters",
                        "weight",
                        "density",
                        "t",
                        "sources",
                        "layer_range",
                        "filter",
                        "value",
                        "base_model",
                    ]
                ),
                st.text(max_size=5),
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=16,
)


@FUZZ
@given(st.text(max_size=300))
def test_recipe_loader_on_arbitrary_text(text):
    _parse_or_recipe_error(text)


@FUZZ
@given(st.dictionaries(_yaml_keys, _yaml_values, max_size=6))
def test_recipe_loader_on_random_yaml_structures(doc):
    _parse_or_recipe_error(yaml.safe_dump(doc))


@FUZZ
@given(
    st.sampled_from(["merge_method: linear", "merge_method: ties\nbase_model: base"]),
    st.text(alphabet="[]{}:,-&*!|>'\"#%@ \nabcxyz019.", max_size=120),
)
def test_recipe_loader_on_yaml_syntax_soup(head, tail):
    _parse_or_recipe_error(f"{head}\nmodels:\n{tail}")


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abcdefgh/_-.", min_size=1, max_size=12),
            st.floats(-1e6, 1e6, allow_nan=False),
        ),
        min_size=1,
        max_size=5,
    ),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
)
def test_valid_recipes_still_parse(models, seed):
    doc = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in models],
    }
    if seed is not None:
        doc["seed"] = seed
    recipe = parse_recipe(yaml.safe_dump(doc))
    assert [(str(m.model), m.parameters["weight"]) for m in recipe.models] == models
    assert recipe.seed == seed


_card_keys = st.sampled_from(
    [
        "base_model",
        "model-index",
        "tags",
        "datasets",
        "license",
        "pipeline_tag",
        "results",
        "metrics",
        "dataset",
        "task",
        "name",
        "type",
        "value",
        "base_model_relation",
    ]
)
_card_values = st.recursive(
    _yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_card_keys, inner, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(_card_keys, _card_values, max_size=6))
def test_card_fields_of_any_type_never_raise(meta):
    from graft.check.lint import _accuracy_claims
    from graft.zoo.index import card_summary

    notes: list[str] = []
    summary = card_summary(meta, notes)
    json.dumps(summary)
    assert all(isinstance(b, str) for b in summary["base_model"])
    assert all("\n" not in n for n in notes)
    for claim in _accuracy_claims(meta, notes):
        assert math.isfinite(claim["claimed"])
