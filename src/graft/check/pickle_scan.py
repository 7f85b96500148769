"""Static scan of pickle bytes, as picklescan does: list every import (``GLOBAL``,
``STACK_GLOBAL``, ``INST``) the pickle would make and the calls it would run
(``REDUCE``, ``NEWOBJ``, ``BUILD``...), without unpickling anything.

An import outside `SAFE_GLOBALS` (what torch and numpy weight files need to rebuild
tensors and containers) is a risk: unpickling a ``REDUCE`` on it calls it with arguments
the file chooses, e.g. ``os.system("...")``. Known-dangerous modules and names are
reported as ``dangerous``, anything else unknown as ``unknown``.

A file may hold several pickles back to back (legacy ``torch.save``: magic number,
protocol, system info, the object, the storage keys, then raw tensor bytes); scanning
continues after each ``STOP`` while the next byte starts a pickle.
"""

from __future__ import annotations

import io
import pickletools

_TORCH_STORAGES = {
    f"{t}Storage"
    for t in (
        "Float",
        "Half",
        "BFloat16",
        "Double",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexFloat",
        "ComplexDouble",
        "QInt8",
        "QUInt8",
        "QInt32",
    )
}
_TORCH_DTYPES = {
    "float32",
    "float",
    "float16",
    "half",
    "bfloat16",
    "float64",
    "double",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "short",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
}
SAFE_GLOBALS: dict[str, set[str]] = {
    "collections": {"OrderedDict", "defaultdict", "Counter", "deque"},
    "builtins": {
        "set",
        "frozenset",
        "slice",
        "complex",
        "bytearray",
        "dict",
        "list",
        "tuple",
        "int",
        "float",
        "bool",
        "str",
        "bytes",
        "object",
        "range",
    },
    "__builtin__": {"set", "frozenset", "slice", "complex", "bytearray", "object"},
    "copyreg": {"_reconstructor"},
    "copy_reg": {"_reconstructor"},
    "_codecs": {"encode"},
    "torch": {
        "Size",
        "device",
        "dtype",
        "layout",
        "memory_format",
        *_TORCH_STORAGES,
        *_TORCH_DTYPES,
        "strided",
        "sparse_coo",
        "contiguous_format",
        "channels_last",
        "preserve_format",
    },
    "torch._utils": {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_sparse_tensor",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_wrapper_subclass",
        "_rebuild_nested_tensor",
    },
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.storage": {"UntypedStorage", "TypedStorage", "_load_from_bytes"},
    "torch.nn.parameter": {"Parameter"},
    "torch.serialization": {"_get_layout"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.dtypes": {
        "Float32DType",
        "Float64DType",
        "Float16DType",
        "Int64DType",
        "Int32DType",
        "Int8DType",
        "UInt8DType",
        "BoolDType",
    },
}
_DANGEROUS_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "socket",
    "shutil",
    "runpy",
    "pty",
    "commands",
    "webbrowser",
    "httplib",
    "http",
    "urllib",
    "requests",
    "importlib",
    "ctypes",
    "code",
    "pickle",
    "_pickle",
    "dill",
    "marshal",
    "types",
    "asyncio",
    "multiprocessing",
    "pip",
    "platform",
    "signal",
    "tempfile",
    "pathlib",
    "io",
    "operator",
    "functools",
}
_DANGEROUS_BUILTINS = {
    "eval",
    "exec",
    "execfile",
    "compile",
    "open",
    "getattr",
    "setattr",
    "delattr",
    "__import__",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "apply",
    "memoryview",
}
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_CALL_OPS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "INST", "OBJ"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def classify(module: str, name: str) -> str:
    """``safe``, ``dangerous`` or ``unknown`` for the import ``module.name``."""
    if name in SAFE_GLOBALS.get(module, ()):
        return "safe"
    top = module.split(".")[0]
    if top in _DANGEROUS_MODULES or (
        top in ("builtins", "__builtin__") and name in _DANGEROUS_BUILTINS
    ):
        return "dangerous"
    return "unknown"


def scan_pickle(data: bytes) -> dict:
    """Imports and calls of the pickle(s) in ``data``, without unpickling.

    Returns:
        ``{"globals": [{"module", "name", "verdict"}...] (distinct, in order),
        "calls": count of call opcodes, "pickles": how many pickles were read,
        "error": why scanning stopped early, or None}``. A pickle cut short or malformed
        is reported in ``error``; what was read before still counts.
    """
    found: dict[tuple[str, str], str] = {}
    calls, pickles, pos, error = 0, 0, 0, None
    while pos < len(data) and data[pos] == 0x80:  # PROTO: another pickle starts here
        try:
            end, n_calls = _scan_one(data, pos, found)
        except Exception as e:  # genops raises ValueError and others on malformed input
            error = f"malformed pickle at byte {pos}: {' '.join(str(e).split())[:120]}"
            break
        calls += n_calls
        pickles += 1
        pos = end
    if pickles == 0 and error is None and data[:1] != b"\x80":
        try:  # protocol 0/1 pickles have no PROTO opcode
            _, calls = _scan_one(data, 0, found)
            pickles = 1
        except Exception:
            error = "not a pickle (no protocol header)"
    globals_ = [{"module": m, "name": n, "verdict": v} for (m, n), v in found.items()]
    return {"globals": globals_, "calls": calls, "pickles": pickles, "error": error}


def _scan_one(data: bytes, start: int, found: dict) -> tuple[int, int]:
    """Scan the pickle at ``start``; returns (offset after its STOP, call count)."""
    memo: dict[int, object] = {}
    strings: list[object] = []  # values pushed by string ops and memo gets, most recent last
    last: object = None  # what the previous opcode pushed, when it was a string
    calls = 0
    stream = io.BytesIO(data)
    stream.seek(start)
    for op, arg, pos in pickletools.genops(stream):
        name = op.name
        if name in _STRING_OPS:
            last = arg
            strings.append(arg)
        elif name in _MEMO_GET:
            last = memo.get(arg)
            strings.append(last)
        elif name in _MEMO_PUT:
            memo[arg] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        else:
            last = None
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            _add(found, module, attr)
        elif name == "STACK_GLOBAL":
            pair = [s for s in strings[-2:] if isinstance(s, str)]
            if len(pair) == 2:
                _add(found, pair[0], pair[1])
            else:
                _add(found, "?", "? (STACK_GLOBAL with unresolved names)")
        if name in _CALL_OPS:
            calls += 1
        if name == "STOP":
            return pos + 1, calls
    raise ValueError("no STOP opcode: the pickle is truncated")


def _add(found: dict, module: str, name: str) -> None:
    verdict = "dangerous" if module == "?" else classify(module, name)
    found.setdefault((module, name), verdict)
