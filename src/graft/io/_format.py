"""The safetensors file format: dtype codes, header parsing with validation, header encoding.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the
data section. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` str->str map.
The reference loader requires the tensors' byte ranges to tile the data section exactly
(sorted by offset: no gap, no overlap, nothing after the last one), whatever the order
of the JSON keys; we enforce the same, so any file graft accepts, safetensors accepts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.io._errors import GraftIOError
from graft.io._readers import MAX_JSON_BYTES, _show, loads_json, open_regular

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = MAX_JSON_BYTES
# numpy's limit on dimensions: every tensor graft reads can become an array.
MAX_DIMS = 64
_INT64_MAX = 2**63 - 1

_CODES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}
# Older torch builds lack some dtypes (uint16+ arrived in 2.3, float8_e8m0fnu in 2.7).
DTYPE_OF_CODE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _CODES.items() if hasattr(torch, name)
}
CODE_OF_DTYPE: dict[torch.dtype, str] = {dt: code for code, dt in DTYPE_OF_CODE.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint header says about one tensor; no tensor data is read to get it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Located:
    """A tensor's header entry plus the absolute byte offset of its data in `info.file`."""

    info: TensorInfo
    offset: int


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header. `tensors` is in file (data offset) order."""

    tensors: list[Located]
    metadata: dict[str, str]
    file_size: int


def parse_header(path: Path) -> Header:
    """Read and validate the header of the safetensors file at `path`.

    Beyond the reference loader's checks: the file must be a regular file (a FIFO would
    block), tensor names unique, strings valid Unicode (no lone surrogates), shapes of at
    most `MAX_DIMS` dimensions whose product (zero dimensions counted as 1) fits an int64,
    so torch can allocate every tensor the header describes.

    Raises:
        GraftIOError: the file cannot be read, or its header is corrupt, truncated or
            inconsistent with the file size.
    """

    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return decode_header(path, size, lambda start, n: os.pread(f.fileno(), n, start))
    except OSError as e:
        raise GraftIOError(
            f"cannot read {path}: {e.strerror}; check the path and permissions"
        ) from e


def decode_header(path: Path, size: int, read) -> Header:
    """`parse_header` for a file of ``size`` bytes read through ``read(start, n) -> bytes``
    (a local file, or a byte-range request to object storage, `graft.io._remote`)."""

    def corrupt(why: str) -> GraftIOError:
        return GraftIOError(
            f"corrupt or truncated safetensors file {path}: {why}; re-download or re-save it"
        )

    if size < 8:
        raise corrupt(f"{size} bytes is too short to hold a header")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise corrupt(f"header length {n} does not fit a {size}-byte file")
    raw = read(8, n)
    if len(raw) != n:
        raise corrupt(f"header of {n} bytes ends after {len(raw)}")
    try:
        header = loads_json(raw, unique_keys=True, strict=True, max_depth=None)
    except ValueError as e:
        raise corrupt(f"header: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and _is_text(k) and _is_text(v) for k, v in metadata.items()
    ):
        raise corrupt("__metadata__ is not a map of strings to strings")

    spans = [_parse_entry(path, name, spec, corrupt) for name, spec in header.items()]
    return Header(_tile(spans, 8 + n, size, corrupt), metadata, size)


def _tile(spans: list[tuple[TensorInfo, int, int]], data_start: int, size: int, corrupt):
    """Check the spans tile the data section exactly; return them located, in file order."""
    spans = sorted(spans, key=lambda s: (s[1], s[2]))  # stable: 0-byte ties keep header order
    tensors, pos = [], 0
    for info, begin, end in spans:
        if data_start + end > size:
            raise corrupt(
                f"tensor {_show(info.name)} ends at byte {data_start + end}, past the end"
            )
        if begin != pos:
            raise corrupt(f"tensor {_show(info.name)} starts at data byte {begin}, expected {pos}")
        tensors.append(Located(info, data_start + begin))
        pos = end
    if data_start + pos != size:
        raise corrupt(f"tensors cover {pos} data bytes but the file has {size - data_start}")
    return tensors


def _parse_entry(path: Path, name: str, spec: object, corrupt) -> tuple[TensorInfo, int, int]:
    if not _is_text(name):
        raise corrupt(f"tensor name {_show(name)} is not valid Unicode")
    if not isinstance(spec, dict):
        raise corrupt(f"entry for tensor {_show(name)} is not an object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPE_OF_CODE:
        known = ", ".join(DTYPE_OF_CODE)
        raise corrupt(f"tensor {_show(name)} has unknown dtype {_show(code)} (graft reads {known})")
    if not _is_int_list(shape) or not _is_int_list(offsets) or len(offsets) != 2:
        raise corrupt(f"tensor {_show(name)} has a malformed shape or data_offsets")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > _INT64_MAX:
        raise corrupt(
            f"tensor {_show(name)} has shape {_show(shape)}, beyond {MAX_DIMS} dimensions or "
            "2**63 elements"
        )
    dtype, (begin, end) = DTYPE_OF_CODE[code], offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise corrupt(
            f"tensor {_show(name)} spans {end - begin} bytes, its shape and dtype need {nbytes}"
        )
    return TensorInfo(name, dtype, tuple(shape), nbytes, path), begin, end


def _is_int_list(x: object) -> bool:
    return isinstance(x, list) and all(type(i) is int and i >= 0 for i in x)


def _is_text(s: object) -> bool:
    """A str that encodes to UTF-8: JSON escapes can produce lone surrogates, which cannot."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]], metadata: dict[str, str]
) -> bytes:
    """The 8-byte length plus JSON header for `(name, dtype, shape, begin, end)` entries.

    The JSON is padded with spaces to a multiple of 8 bytes, as the reference writer does,
    so the data section starts 8-byte aligned in the file (and in a memory map of it).
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, begin, end in entries:
        header[name] = {
            "dtype": CODE_OF_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [begin, end],
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_safetensors_header(
    path: str | os.PathLike,
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read the tensor table and ``__metadata__`` of one safetensors file, without its data.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``({name: TensorInfo}, metadata)``, names in file order.

    Raises:
        GraftIOError: the file is missing, unreadable, corrupt or truncated.
    """
    header = parse_header(Path(path))
    return {t.info.name: t.info for t in header.tensors}, header.metadata
