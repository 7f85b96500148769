"""Static scan of pickles: what unpickling a file would import and call, found without
unpickling anything.

The scan is a stack machine over `pickletools.genops` that models `pickle.Unpickler`:
the value stack with its marks, the memo (``PUT``/``BINPUT``/``LONG_BINPUT``/``MEMOIZE``
and the ``GET`` opcodes), ``POP``/``POP_MARK``/``DUP``, every container opcode. Every
import (``GLOBAL``, ``STACK_GLOBAL``, ``INST``) is resolved from the values the machine
tracked, so pushing ``os``/``system``, two harmless strings and a ``POP`` cannot hide
it, nor can storing the module name in the memo. Protocol 0-2 names are mapped as
`pickle` maps them (``__builtin__`` -> ``builtins``, ``commands`` -> ``subprocess``).

The rules, fail closed:

- an import outside `SAFE_GLOBALS` (what ``torch.save`` and numpy files need to rebuild
  tensors and containers) is a risk, ``dangerous`` for known code runners (`classify`),
  ``unknown`` otherwise: unpickling imports it (running the module's top level) and a
  ``REDUCE`` calls it with arguments the file chooses;
- anything the machine cannot resolve is an *issue*, also a risk: a ``STACK_GLOBAL``
  whose operands are not known strings, an ``EXT1/2/4`` code (an import through
  `copyreg`'s extension registry), a call of a value that is not an import, a ``BUILD``
  or ``SETITEM``/``APPEND`` on an imported object itself (it would patch it), an unknown
  opcode, a stack underflow, a truncated stream;
- every pickle a loader can reach is scanned: each ``*pkl`` member of a zip (by entry,
  so a duplicated name cannot hide one), and for any other file every pickle back to
  back from byte 0, whatever its protocol. A legacy ``torch.save`` file (first pickle
  the torch magic number) has exactly five pickles and then the storages they name; the
  scan checks that those storages fill the rest of the file. Bytes no rule accounts for
  (after a plain pickle, after the storages), a file that is both a zip and a pickle,
  and a tar archive (which old ``torch.load`` unpickles member by member) are issues.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import tarfile
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

_STORAGE_SIZES = {  # element size in bytes of each storage class torch pickles
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}
# dtypes pickle as ``torch.<name>`` (``torch.float32.__reduce__() == "float32"``).
_TORCH_DTYPES = {
    *("float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128"),
    *("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"),
    *("float8_e8m0fnu", "float4_e2m1fn_x2", "bool", "qint8", "quint8", "qint32"),
    *("quint4x2", "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"),
    *(f"int{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)),
    *(f"uint{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)),
}
_QSCHEMES = {
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
}
_TORCH_REBUILDS = {
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
}
# Names as the unpickler imports them (after the protocol 0-2 mapping). Each torch entry
# is one torch.load(weights_only=True) accepts too (tests/test_pickle_scan.py checks).
# torch.storage._load_from_bytes is not here: it runs torch.load(weights_only=False) on
# bytes the file holds, a full unpickle of a nested payload.
SAFE_GLOBALS: dict[str, set[str]] = {
    "collections": {"OrderedDict", "Counter", "defaultdict", "deque"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray", "range"},
    "copyreg": {"_reconstructor"},
    "_codecs": {"encode"},  # bytes at protocol 2: _codecs.encode(text, "latin1")
    "torch": {
        *("Size", "Tensor", "device"),
        *(n for n in _STORAGE_SIZES if n != "UntypedStorage"),
        *_TORCH_DTYPES,
        *_QSCHEMES,
    },
    "torch.cuda": {n for n in _STORAGE_SIZES if n != "UntypedStorage" and "Q" not in n},
    "torch._utils": _TORCH_REBUILDS,
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.storage": {"UntypedStorage", "TypedStorage"},
    "torch.nn.parameter": {"Parameter"},
    "torch.serialization": {"_get_layout"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},  # arrays at protocol 5
    "numpy._core.numeric": {"_frombuffer"},
    "numpy.dtypes": {
        *("Float16DType", "Float32DType", "Float64DType", "BoolDType"),
        *("Int8DType", "Int16DType", "Int32DType", "Int64DType"),
        *("UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType"),
    },
}
_DANGEROUS_MODULES = {
    *("os", "posix", "nt", "subprocess", "sys", "socket", "shutil", "runpy", "pty"),
    *("commands", "webbrowser", "httplib", "http", "urllib", "requests", "importlib"),
    *("ctypes", "code", "codeop", "pickle", "_pickle", "dill", "cloudpickle", "marshal"),
    *("types", "asyncio", "multiprocessing", "pip", "platform", "signal", "tempfile"),
    *("pathlib", "io", "_io", "operator", "_operator", "functools", "pdb", "bdb"),
    *("cProfile", "profile", "timeit", "pydoc", "pkgutil", "uuid", "venv", "ensurepip"),
    *("joblib", "numpy.f2py", "numpy.testing", "_posixsubprocess", "ssl", "ftplib"),
}
_DANGEROUS_NAMES = {
    "builtins": {
        *("eval", "exec", "execfile", "compile", "open", "getattr", "setattr", "delattr"),
        *("__import__", "globals", "locals", "vars", "input", "breakpoint", "apply"),
        *("memoryview", "type", "help", "exit", "quit"),
    },
    "torch": {"load", "hub"},
    "torch.serialization": {"load"},
    "torch.storage": {"_load_from_bytes"},
    "torch.jit": {"load"},
    "numpy": {"load", "loads"},
}
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save file
_ZIP_MAGIC = b"PK\x03\x04"  # torch.load's own test for the zip format: these first bytes
_MAX_LINE = 8 << 20  # a longer protocol-0 line is not scanned (reads stay bounded)
_MAX_VALUE = 1024  # longer strings are tracked as opaque: import names are short
_MAX_ITEMS = 1 << 16  # list items tracked (legacy storage keys); more are opaque
_MAX_ISSUES = 20


def classify(module: str, name: str) -> str:
    """``safe``, ``dangerous`` or ``unknown`` for the import ``module.name`` (as the
    unpickler imports it, after `_py3_name`)."""
    if name in SAFE_GLOBALS.get(module, ()):
        return "safe"
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if prefixes & _DANGEROUS_MODULES or name in _DANGEROUS_NAMES.get(module, ()):
        return "dangerous"
    return "unknown"


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """The name `pickle.Unpickler.find_class` imports for a protocol 0-2 pickle."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def scan_pickle(data: bytes) -> dict:
    """Imports and calls of the pickle(s) in ``data``, without unpickling.

    ``data`` is a whole non-zip file or one zip member; its pickles are read back to back
    from byte 0 (module doc).

    Returns:
        ``{"globals": [{"module", "name", "verdict"}...] (distinct, in order), "calls":
        count of call opcodes, "pickles": how many pickles were read, "issues": what the
        scan could not resolve (each a risk), "error": the issue that stopped the scan
        early, or None, "safe": no issue and every import safe}``.
    """
    return _scan_stream(io.BytesIO(data), len(data))


def scan_file(f: BinaryIO, name: str) -> list[dict]:
    """One `scan_pickle` result (with ``"file"``) per pickle stream of an open file.

    A file starting with a zip header (as ``torch.save`` writes since torch 1.6) gives
    one result per ``*pkl`` member, named ``NAME:member``; any other file one result for
    its pickles back to back, plus the members of a zip hidden behind them.
    """
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    is_zip_start = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    archive = _open_zip(f)
    if not is_zip_start:
        f.seek(0)
        main = {"file": name, **_scan_stream(f, size)}
        if archive is not None:
            _issue(
                main,
                "it is both a pickle and a zip: torch.load reads it as pickles, zip "
                "readers as an archive ending the file; one of the two is a disguise",
            )
        if _is_tar(f):
            _issue(
                main,
                "it is a tar archive, which old torch.load versions unpickle "
                "member by member; graft does not scan tar members",
            )
        return [main] + (_scan_members(archive, name) if archive is not None else [])
    if archive is None:
        return [_failed(name, "it starts with a zip header but is not a readable zip")]
    scans = _scan_members(archive, name)
    f.seek(0)
    also = _as_pickle(f, size)
    if also is not None:
        _issue(also, "it is both a zip and a pickle: loaders disagree on what it holds")
        scans.insert(0, {"file": name, **also})
    return scans


def _scan_members(archive: zipfile.ZipFile, name: str) -> list[dict]:
    scans = []
    with archive:
        for info in archive.infolist():  # entries, not names: duplicates are each scanned
            if not info.filename.lower().endswith("pkl"):
                continue
            label = f"{name}:{info.filename}"
            try:
                with archive.open(info) as member:
                    scans.append({"file": label, **_scan_stream(member, info.file_size)})
            except Exception as e:  # encrypted, corrupt, unsupported compression...
                scans.append(_failed(label, f"member cannot be read: {_one_line(e)}"))
    return scans


def _open_zip(f: BinaryIO) -> zipfile.ZipFile | None:
    f.seek(0)
    try:
        archive = zipfile.ZipFile(f)
    except Exception:  # BadZipFile, or a malformed end record that zipfile trips on
        return None
    return archive if archive.infolist() else None


def _is_tar(f: BinaryIO) -> bool:
    f.seek(0)
    try:  # as torch's legacy loader opens it
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except Exception:
        return False


def _as_pickle(f: BinaryIO, size: int) -> dict | None:
    """The scan of a zip's bytes read as one pickle, or None when they are not one (a
    zip's first byte is PERSID: its line, then opcodes to a STOP, stack kept sound)."""
    report = _new_report()
    try:
        _Machine(report).run(_Reader(f, size))
    except _Malformed:
        return None
    report["pickles"] = 1
    return _finish(report)


def _failed(name: str, why: str) -> dict:
    report = {"file": name, **_new_report()}
    _issue(report, why)
    report["error"] = report["issues"][0]
    return _finish(report)


def _new_report() -> dict:
    return {"globals": [], "calls": 0, "pickles": 0, "issues": [], "error": None}


def _issue(report: dict, why: str) -> None:
    if len(report["issues"]) < _MAX_ISSUES:
        report["issues"].append(why)
    report["safe"] = False


def _finish(report: dict) -> dict:
    report["safe"] = not report["issues"] and all(g["verdict"] == "safe" for g in report["globals"])
    return report


def _scan_stream(f: BinaryIO, size: int) -> dict:
    """Scan the pickles of ``f`` (``size`` bytes, at byte 0) back to back (module doc)."""
    report = _new_report()
    values, pids, pos = [], [], 0
    if size == 0:
        _issue(report, "empty: not a pickle")
    while pos < size:
        machine = _Machine(report)
        reader = _Reader(f, size)
        try:
            values.append(machine.run(reader))
        except _Malformed as e:
            where = "malformed pickle" if not values else "data after the pickles that is not one"
            report["error"] = f"{where} at byte {pos}: {e}"
            _issue(report, report["error"])
            break
        report["pickles"] += 1
        pids += machine.pids
        pos = reader.tell()
        if _is_int(values[0], MAGIC_NUMBER) and len(values) == 5:
            gap = _storage_gap(f, pos, size, values[4], pids)
            if gap:
                _issue(report, f"legacy torch file: {gap}")
            break
    if _is_int(values[0] if values else None, MAGIC_NUMBER) and len(values) < 5:
        _issue(report, f"legacy torch file with {len(values)} of its 5 pickles")
    return _finish(report)


def _is_int(value: object, expected: int) -> bool:
    return type(value) is int and value == expected


def _storage_gap(f: BinaryIO, pos: int, size: int, keys: object, pids: list) -> str | None:
    """Why the bytes after a legacy file's 5th pickle are not exactly its storages, or
    None. Each storage (in the order of the key list, the 5th pickle) is an 8-byte
    little-endian element count and the elements; the element size comes from the
    storage class in the persistent id ``("storage", cls, key, location, numel, ...)``."""
    if not isinstance(keys, _List) or keys.overflow:
        return "its 5th pickle is not the list of storage keys"
    if any(isinstance(pid, str) for pid in pids):  # protocol 0 writes str(tuple)
        return "its storages are named by text persistent ids, which torch.load cannot read"
    sizes = {}
    for pid in pids:
        if isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[1], _Global):
            sizes.setdefault(pid[2], _STORAGE_SIZES.get(pid[1].name))
    for key in keys.items:
        if sizes.get(key) is None:
            return f"storage {key!r} has no storage class the scan knows"
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return f"storage {key!r} is missing (the file ends at byte {size})"
        pos += 8 + int.from_bytes(head, "little") * sizes[key]
        if pos > size:
            return f"storage {key!r} runs past the end of the file"
    if pos != size:
        return f"{size - pos} bytes after the last storage that nothing accounts for"
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160]


class _Malformed(Exception):
    """The pickle cannot be read to its STOP (the real unpickler would fail there too)."""


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Opaque:
    """A value the scan does not track (a call's result, a dict, a long string...)."""

    kind: str


class _List:
    def __init__(self, items: list | None = None):
        self.items: list = []
        self.overflow = False
        self.extend(items or [])

    def extend(self, items: list) -> None:
        room = _MAX_ITEMS - len(self.items)
        self.items += items[:room]
        self.overflow |= len(items) > room


_MARK = _Opaque("mark")


class _Reader:
    """A file as genops reads it, bounded: a length field cannot make a read allocate
    more than the stream holds, nor a protocol-0 line run longer than `_MAX_LINE`."""

    def __init__(self, f: BinaryIO, size: int):
        self._f, self._size = f, size

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(self._size - self._f.tell(), 0)
        return self._f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        left = max(self._size - self._f.tell(), 0)
        return self._f.readline(min(_MAX_LINE, left))


_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_VALUE_OPS = {  # opcodes whose genops argument is the value they push
    *("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"),
    *("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE"),
    *("BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"),
}
_CALLS = {"REDUCE": 1, "NEWOBJ": 1, "NEWOBJ_EX": 2}  # arguments popped above the callable
_MUTATORS = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # values popped above the target
_MARK_MUTATORS = {"APPENDS", "SETITEMS", "ADDITEMS"}
_MARK_BUILDERS = {"TUPLE": tuple, "LIST": _List, "DICT": None, "FROZENSET": None}
_NO_EFFECT = {"PROTO", "FRAME", "READONLY_BUFFER"}


class _Machine:
    """The unpickler's stack and memo for one pickle, tracking values, not running them."""

    def __init__(self, report: dict):
        self.report = report
        self.stack: list = []
        self.memo: dict = {}
        self.pids: list = []  # persistent ids (torch's storages), for the legacy check
        self.proto = 0
        self.seen = {(g["module"], g["name"]) for g in report["globals"]}

    def run(self, reader: _Reader) -> object:
        """Walk the pickle to its STOP; returns the value it would produce (tracked)."""
        try:
            for op, arg, pos in pickletools.genops(reader):
                self.op, self.pos = op.name, pos
                if op.name == "STOP":
                    return self.pop()
                self.step(op.name, arg)
        except _Malformed:
            raise
        except Exception as e:  # genops: unknown opcode, truncated argument, bad line...
            raise _Malformed(_one_line(e)) from e
        raise _Malformed("no STOP opcode: the pickle is truncated")

    def step(self, name: str, arg: object) -> None:
        if name in _VALUE_OPS:
            self.push(_value(arg))
        elif name in _CONSTANTS:
            self.push(_CONSTANTS[name])
        elif name == "EMPTY_LIST":
            self.push(_List())
        elif name in ("EMPTY_DICT", "EMPTY_SET"):
            self.push(_Opaque(name[6:].lower()))
        elif name.startswith("TUPLE") and name != "TUPLE":
            n = int(name[5:])
            self.push(tuple(reversed([self.pop() for _ in range(n)])))
        elif name in _MARK_BUILDERS:
            items = self.pop_mark()
            build = _MARK_BUILDERS[name]
            self.push(build(items) if build else _Opaque(name.lower()))
        elif name in _MARK_MUTATORS:
            items = self.pop_mark()
            self.mutate(self.top(), items)
        elif name in _MUTATORS:
            items = [self.pop() for _ in range(_MUTATORS[name])]
            self.mutate(self.top(), items if name == "APPEND" else [])
        else:
            self.step_other(name, arg)

    def step_other(self, name: str, arg: object) -> None:
        if name == "MARK":
            self.stack.append(_MARK)
        elif name == "POP":  # the top value, or the mark on top (as _pickle.c does)
            if not self.stack:
                raise _Malformed(f"stack underflow at byte {self.pos}")
            self.stack.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.push(self.top())
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise _Malformed(f"memo entry {arg} read before it is written (byte {self.pos})")
            self.push(self.memo[arg])
        elif name in _NO_EFFECT:
            self.proto = arg if name == "PROTO" else self.proto
        else:
            self.step_import_or_call(name, arg)

    def step_import_or_call(self, name: str, arg: object) -> None:
        if name == "GLOBAL":
            parts = _split_global(arg)
            if parts is None:
                self.unresolved(f"GLOBAL {_show(arg)} (a space in a name)")
            else:
                self.push(self.import_(*parts))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if isinstance(module, str) and isinstance(attr, str):
                self.push(self.import_(module, attr))
            else:
                self.unresolved(f"STACK_GLOBAL of {_show(module)}, {_show(attr)}")
        elif name == "INST":
            args, parts = self.pop_mark(), _split_global(arg)
            if parts is None:
                self.unresolved(f"INST {_show(arg)} (a space in a name)")
            else:
                self.call(self.import_(*parts), args)
        elif name == "OBJ":
            items = self.pop_mark()
            if not items:
                raise _Malformed(f"OBJ without a class at byte {self.pos}")
            self.call(items[0], items[1:])
        elif name in _CALLS:
            args = [self.pop() for _ in range(_CALLS[name])]
            self.call(self.pop(), args)
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.unresolved(f"{name} {arg} (an import through copyreg's extension registry)")
        elif name in ("PERSID", "BINPERSID"):
            self.pids.append(arg if name == "PERSID" else self.pop())
            self.push(_Opaque("persistent"))
        elif name == "NEXT_BUFFER":
            self.push(_Opaque("buffer"))
        else:  # a future protocol's opcode: nothing says what it does
            raise _Malformed(f"opcode {name} at byte {self.pos} is not modelled")

    def import_(self, module: str, name: str) -> _Global:
        if self.proto < 3:  # fix_imports, as pickle.Unpickler does by default
            module, name = _py3_name(module, name)
        if (module, name) not in self.seen:
            self.seen.add((module, name))
            verdict = classify(module, name)
            self.report["globals"].append({"module": module, "name": name, "verdict": verdict})
        return _Global(module, name)

    def call(self, callee: object, args: list) -> None:
        self.report["calls"] += 1
        if not isinstance(callee, _Global):
            self.issue(f"{self.op} at byte {self.pos} calls {_show(callee)}, not an import")
        self.push(_Opaque(f"result of {_show(callee)}"))

    def mutate(self, target: object, items: list) -> None:
        if self.op == "BUILD":
            self.report["calls"] += 1  # BUILD calls __setstate__
        if isinstance(target, _Global):
            self.issue(f"{self.op} at byte {self.pos} changes the imported {_show(target)}")
        elif isinstance(target, _List) and self.op in ("APPEND", "APPENDS"):
            target.extend(items)

    def unresolved(self, what: str) -> None:
        self.issue(f"{what} at byte {self.pos}: the scan cannot tell what it imports")
        self.push(_Opaque("unresolved import"))

    def issue(self, why: str) -> None:
        _issue(self.report, why)

    def push(self, value: object) -> None:
        self.stack.append(value)

    def top(self) -> object:
        if not self.stack or self.stack[-1] is _MARK:
            raise _Malformed(f"stack underflow at byte {self.pos}")
        return self.stack[-1]

    def pop(self) -> object:
        value = self.top()
        self.stack.pop()
        return value

    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise _Malformed(f"{self.op} without a MARK at byte {self.pos}")


def _split_global(arg: object) -> tuple[str, str] | None:
    """genops gives ``GLOBAL``/``INST`` as ``"module name"``; a space inside either name
    would make the split ambiguous."""
    parts = str(arg).split(" ")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _value(arg: object) -> object:
    if isinstance(arg, str | bytes | bytearray) and len(arg) > _MAX_VALUE:
        return _Opaque(f"{type(arg).__name__} of {len(arg)}")
    return bytes(arg) if isinstance(arg, bytearray) else arg


def _show(value: object) -> str:
    if isinstance(value, _Global):
        return f"{value.module}.{value.name}"
    if isinstance(value, _Opaque):
        return f"<{value.kind}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
