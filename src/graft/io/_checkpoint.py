"""Lazy, per-tensor reading of checkpoints: safetensors files, sharded HF dirs, torch files."""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

from graft.io._errors import GraftIOError
from graft.io._format import Header, TensorInfo, parse_header
from graft.io._readers import _show, open_regular, read_json

# Files of a Hugging Face model dir, in the order we prefer them.
_ST_INDEX, _ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
_PT_INDEX, _PT_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_GGUF = ".gguf"
_MODULES = "modules.json"  # sentence-transformers
_HUB_REPOS = ("models--", "datasets--")  # repo folders of the Hugging Face hub cache

# config.json fields graft reads (`graft.plan.arch.LAYER_COUNT_KEYS` counts blocks; widths
# and counts size models), with the largest value accepted: far above any real model, far
# below what would make a loop over layers or an allocation run away. null means unset.
MAX_LAYERS = 100_000
CONFIG_COUNT_LIMITS = {
    "num_hidden_layers": MAX_LAYERS,
    "n_layer": MAX_LAYERS,
    "num_layers": MAX_LAYERS,
    "n_layers": MAX_LAYERS,
    "num_attention_heads": 100_000,
    "n_head": 100_000,
    "hidden_size": 10_000_000,
    "n_embd": 10_000_000,
    "d_model": 10_000_000,
    "vocab_size": 100_000_000,
}


def _is_count(limit: int):
    return lambda v: type(v) is int and 0 <= v <= limit


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# What each config.json field graft reads must be (null always means "unset").
_CONFIG_CHECKS = {
    **{
        key: (_is_count(limit), f"a whole number from 0 to {limit:,}")
        for key, limit in CONFIG_COUNT_LIMITS.items()
    },
    **{
        key: (lambda v: isinstance(v, str), "a string")
        for key in ("model_type", "torch_dtype", "dtype")
    },
    "architectures": (_is_str_list, "a list of class names"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),  # plan.arch
}

# Tensors are read with pread into fresh memory rather than viewed through a memory map:
# the process then holds only the tensors in flight, whereas mapped pages stay resident
# (and count against RSS) until the map goes, which for a whole-model pass is the model.


class Checkpoint:
    """A read-only, lazily loaded set of named tensors on disk. Get one with `open_checkpoint`.

    Header facts (`names`, `info`, `total_bytes`, ...) come from file headers only. `get`
    reads one tensor and is safe to call from several threads at once.

    Attributes:
        path: the path as given to `open_checkpoint`.
        root: the model directory (holding config.json, tokenizer files), or None for a
            bare file. For the older sentence-transformers layout it is the Transformer
            module's folder (``0_Transformer/``).
        modules_root: for that older layout only, the sentence-transformers folder around
            `root` (holding ``modules.json``, the pooling module...); else None.
        names: tensor names in file order (shard by shard, then by position in the file).
        metadata: the safetensors ``__metadata__`` of the first file ({} for torch files).
    """

    def __init__(
        self,
        path: Path,
        root: Path | None,
        infos: list[TensorInfo],
        *,
        offsets: dict[str, int] | None = None,
        file_sizes: dict[Path, int] | None = None,
        loaded: dict[str, torch.Tensor] | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self.path = path
        self.root = root
        self.modules_root: Path | None = None
        self.names = [i.name for i in infos]
        self.metadata = metadata or {}
        self._infos = {i.name: i for i in infos}
        self._offsets = offsets or {}
        self._file_sizes = file_sizes or {}
        self._loaded = loaded
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._config: dict | None = None
        self._config_read = False

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

    def __reduce__(self):
        # Pickled (to a Ray worker of a distributed merge) as "open this path again": open
        # files do not travel, and an absolute path still names it from another directory.
        return (open_checkpoint, (Path(self.path).absolute(),))

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def config(self) -> dict | None:
        """The parsed config.json of `root`, or None when there is none.

        Raises:
            GraftIOError: config.json is not a JSON object within graft's limits, or a
                field graft reads has the wrong type or an absurd value
                (`CONFIG_COUNT_LIMITS`).
        """
        if not self._config_read:
            self._config = _read_config(self.root)
            self._config_read = True
        return self._config

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, size and file of tensor `name`, from the header.

        Raises:
            GraftIOError: no tensor has that name.
        """
        info = self._infos.get(name)
        if info is None:
            raise GraftIOError(
                f"tensor {name!r} is not in checkpoint {self.path}; check the name "
                f"(`graft inspect {self.path}` lists them)"
            )
        return info

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, as a CPU tensor in its stored dtype.

        For safetensors files the bytes are read (``pread``, which releases the GIL) into
        a fresh tensor the caller owns: writing into it never reaches the file or another
        `get`, and memory is freed as soon as the caller drops it.

        Raises:
            GraftIOError: no tensor has that name, or the checkpoint is closed.
        """
        info = self.info(name)
        if self._closed:
            raise GraftIOError(f"checkpoint {self.path} is closed; open it again to read {name!r}")
        if self._loaded is not None:
            return self._loaded[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        out = torch.empty(info.shape, dtype=info.dtype)
        _pread_into(self._fd(info.file), out, self._offsets[name], info.file)
        return out

    def fingerprint(self) -> str:
        """A short content hash: names, dtypes, shapes and the first bytes of every tensor.

        Cheap (a few hundred bytes read per tensor) yet different for any two checkpoints
        whose weights differ near the start of any tensor, which a fine-tune always does.
        Statistics files record it to catch statistics computed on another model.
        """
        h = hashlib.sha256()
        for name in sorted(self.names):
            info = self._infos[name]
            h.update(f"{name}|{info.dtype}|{tuple(info.shape)}".encode())
            t = self.get_prefix(name, 256)
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:32]

    def get_prefix(self, name: str, nbytes: int) -> torch.Tensor:
        """Up to ``nbytes`` of tensor ``name``'s raw data, as uint8."""
        info = self.info(name)
        n = min(nbytes, info.nbytes)
        if self._loaded is not None:
            full = self._loaded[name].contiguous().reshape(-1).view(torch.uint8)
            return full[:n].clone()
        out = torch.empty(n, dtype=torch.uint8)
        if n:
            _pread_into(self._fd(info.file), out, self._offsets[name], info.file)
        return out

    quantization = None  # `graft.io._quant.Quantization` for checkpoints decoded as read

    def stored_format(self, name: str) -> str | None:
        """How tensor ``name`` is stored when that differs from what `get` returns
        (``Q4_1``, ``float8_e4m3fn 128x128``...); None for a tensor read as stored."""
        self.info(name)
        return None

    def _reads_whole(self, name: str) -> bool:
        """True when ``name`` cannot be read in parts (loaded torch files, decoded tensors)."""
        return self._loaded is not None

    def _stored_info(self, name: str) -> TensorInfo:
        """The header entry of a stored tensor (which decoded checkpoints may not list)."""
        return self._infos[name]

    def close(self) -> None:
        """Close the open files. Tensors already returned are unaffected."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
            self._loaded = {} if self._loaded is not None else None
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = _open_file(file, self._file_sizes[file])
                    self._fds[file] = fd
        return fd


def _open_file(file: Path, expected_size: int) -> int:
    fd = open_regular(file)
    if os.fstat(fd).st_size != expected_size:
        os.close(fd)
        raise GraftIOError(f"{file} changed on disk since it was opened; open the checkpoint again")
    return fd


def _pread_into(fd: int, out: torch.Tensor, offset: int, file: Path) -> None:
    """Fill ``out`` with the bytes at ``offset``; short reads (large tensors) are continued."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise GraftIOError(f"{file} ended early while reading; the file is truncated")
        done += n


def _read_config(root: Path | None) -> dict | None:
    if root is None or not (root / "config.json").is_file():
        return None
    path = root / "config.json"
    config = read_json(path, fix="fix or re-download it")
    if not isinstance(config, dict):
        raise GraftIOError(f"{path} is not a JSON object; fix or re-download it")
    for key, (valid, want) in _CONFIG_CHECKS.items():
        value = config.get(key)
        if value is not None and not valid(value):
            raise GraftIOError(
                f"{path}: {key} is {_show(value)}, expected {want}; fix or re-download it"
            )
    return config


# Metadata keys of the files graft writes that hold tensors but are not models.
_NOT_MODELS = {
    "graft_delta": "a graft delta or patch (`graft apply BASE DELTA -o OUT` makes a model)",
    "graft_statistic": "a graft statistics or head file",
    "graft_continual": "a continual-merge running sum (the merged model is STATE/model)",
}


def not_a_model(metadata: dict[str, str]) -> str | None:
    """What a file graft wrote is, by its safetensors metadata, when it is no model (a
    delta, patch, statistics or head file, continual state); None otherwise."""
    return next((what for key, what in _NOT_MODELS.items() if key in metadata), None)


def open_model(path: str | os.PathLike) -> Checkpoint:
    """`open_checkpoint` for a path that must hold a model: graft's own deltas, patches,
    statistics, heads and continual states hold tensors of a model's names, so merging or
    diffing one as a model would run and write garbage; they are refused by their metadata.

    Raises:
        GraftIOError: as `open_checkpoint`, or ``path`` is one of those files.
    """
    ckpt = open_checkpoint(path)
    what = not_a_model(ckpt.metadata)
    if what is not None:
        ckpt.close()
        raise GraftIOError(f"{path} is {what}, not a model; give a model folder or file")
    return ckpt


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint for lazy reading; only headers are read here.

    Accepts a Hugging Face model dir (``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` / its sharded index), a
    single ``.safetensors`` file, a ``.gguf`` file (needs ``graft[gguf]``; tensors and
    config mapped to the Hugging Face layout, `graft.io._gguf`) or a ``.bin``/``.pt``/
    ``.pth`` file, or any of the safetensors forms at an fsspec URL (``s3://``,
    ``file://``..., `graft.io._remote`). FP8 safetensors (float8 weights with their scales) read dequantized
    (`graft.io._fp8`); `Checkpoint.quantization` says what is stored. Torch files are read
    only with ``torch.load(weights_only=True)``, which refuses pickled code (memory-mapped,
    except legacy non-zip files). A sentence-transformers folder in the older layout, whose
    ``modules.json`` puts the transformer in ``0_Transformer/``, is read from there
    (`Checkpoint.root` is that folder, `Checkpoint.modules_root` the folder given).
    Weight files of a model folder must resolve inside it (symlinks to Hugging Face cache
    blobs excepted); only regular files are read.

    Raises:
        GraftIOError: the path is missing, holds nothing loadable, is a PEFT adapter, is
            quantized in a format graft cannot decode (bitsandbytes, AWQ, GPTQ...), or a
            file in it is corrupt or unsafe.
    """
    from graft.io._remote import is_url, open_url  # it builds on this module

    if is_url(path):  # s3://, gs://, file://...: byte ranges through fsspec
        return open_url(path)  # type: ignore[arg-type]
    given = Path(path)
    if not given.exists():
        raise GraftIOError(f"no such file or directory: {given}")
    if given.is_dir():
        return _dequantized(_open_dir(given))
    if given.suffix == ".safetensors":
        return _dequantized(_open_safetensors(given, None, [given], None))
    if given.suffix in _TORCH_SUFFIXES:
        return _open_torch(given, None, [given], None)
    if given.suffix == _GGUF:
        from graft.io._gguf import open_gguf  # the optional gguf package, imported lazily

        return open_gguf(given)
    raise GraftIOError(
        f"{given} is not a checkpoint graft reads; pass a .safetensors, .gguf, .bin, .pt or "
        ".pth file or a Hugging Face model directory"
    )


def _dequantized(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt``, or its dequantized view when it holds FP8 weights (`graft.io._fp8`);
    quantized formats graft cannot decode are refused (`check_quantization_config`)."""
    from graft.io._fp8 import open_fp8  # these modules build on this one
    from graft.io._quant import check_quantization_config

    try:
        config = ckpt.config
    except GraftIOError:
        return ckpt  # reading `config` reports it, as for any checkpoint
    try:
        method = check_quantization_config(config, ckpt.root or ckpt.path)
        return open_fp8(ckpt, method)
    except BaseException:
        ckpt.close()
        raise


def _open_dir(d: Path) -> Checkpoint:
    ckpt = _open_model_files(d, d)
    if ckpt is not None:
        return ckpt
    module = transformer_module_dir(d)
    if module is not None and (ckpt := _open_model_files(d, module)) is not None:
        ckpt.modules_root = d
        return ckpt
    if (d / "adapter_config.json").is_file():
        raise GraftIOError(
            f"{d} is a PEFT adapter (adapter_config.json), not a full checkpoint; "
            "merge it into its base model first or pass the base model directory"
        )
    found = sorted(
        p.name for p in d.iterdir() if p.suffix in (".safetensors", _GGUF, *_TORCH_SUFFIXES)
    )
    hint = f"; found {', '.join(found)}: pass one of those files directly" if found else ""
    raise GraftIOError(
        f"no checkpoint in {d}: expected {_ST_SINGLE}, {_ST_INDEX}, {_PT_SINGLE} or {_PT_INDEX}"
        + hint
    )


def _open_model_files(path: Path, d: Path) -> Checkpoint | None:
    """The checkpoint whose Hugging Face files are in ``d``, or None when there are none."""
    if (d / _ST_INDEX).is_file():
        names, shards = _read_index(d / _ST_INDEX)
        return _open_safetensors(path, d, shards, names)
    if (d / _ST_SINGLE).is_file():
        return _open_safetensors(path, d, [_inside(d, d / _ST_SINGLE)], None)
    if (d / _PT_INDEX).is_file():
        names, shards = _read_index(d / _PT_INDEX)
        return _open_torch(path, d, shards, names)
    if (d / _PT_SINGLE).is_file():
        return _open_torch(path, d, [_inside(d, d / _PT_SINGLE)], None)
    return None


def transformer_module_dir(d: Path) -> Path | None:
    """The Transformer module folder of a sentence-transformers folder in the older layout
    (``modules.json`` names a Transformer module with a path of its own, ``0_Transformer``,
    which holds the weights, config and tokenizer); None for any other folder.

    Raises:
        GraftIOError: ``modules.json`` is malformed or names a path outside ``d``.
    """
    modules = d / _MODULES
    if not modules.is_file():
        return None
    doc = read_json(modules, fix="fix or remove it")
    if not isinstance(doc, list):
        raise GraftIOError(f"{modules} is not a list of modules; fix or remove it")
    for entry in doc:
        if not isinstance(entry, dict) or not str(entry.get("type", "")).endswith("Transformer"):
            continue
        sub = entry.get("path")
        if not isinstance(sub, str) or not sub:
            return None  # the transformer's files are in d itself
        if Path(sub).is_absolute() or ".." in Path(sub).parts or "\0" in sub:
            raise GraftIOError(f"{modules} names module path {_show(sub)} outside {d}; fix it")
        folder = d / sub
        return _inside(d, folder) if folder.is_dir() else None
    return None


def _inside(folder: Path, file: Path) -> Path:
    """``file``, once checked to resolve inside ``folder`` or to a blob of a Hugging Face
    hub cache (``.../models--org--name/blobs/HASH``, where the hub links snapshot files
    and older ``local_dir`` downloads): neither a symlink nor an index entry can make graft
    read a file from anywhere else on the machine."""
    try:
        real, top = file.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise GraftIOError(f"cannot resolve {file}: {e}; fix the link") from None
    blob = real.parent.name == "blobs" and real.parent.parent.name.startswith(_HUB_REPOS)
    if not (blob or real == top or real.is_relative_to(top)):
        raise GraftIOError(
            f"{file} resolves to {real}, outside the model folder {folder}; graft reads only "
            "files inside a model folder (or Hugging Face cache blobs): copy the file in"
        )
    return file


def _is_file_name(name: object) -> bool:
    """A bare file name: no directory part, not '' / '..', no NUL byte."""
    return (
        isinstance(name, str)
        and Path(name).name == name
        and name not in ("", "..")
        and ("\0" not in name)
    )


def _read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    """The index's name -> shard file map, and the shard paths in name order. Every shard
    must be a plain file name in the index's folder and resolve inside it (`_inside`)."""
    fix = "re-download the checkpoint"
    doc = read_json(index, fix=fix, unique_keys=True)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise GraftIOError(f"{index} has no weight_map object; {fix}")
    for name, shard in weight_map.items():
        if not _is_file_name(shard):
            raise GraftIOError(
                f"{index} maps tensor {_show(name)} to {_show(shard)}, which is not a file name "
                f"in the index's folder (absolute paths and '..' are refused); {fix}"
            )
    shards = [index.parent / f for f in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise GraftIOError(f"shard {shard.name} listed in {index} is missing; {fix}")
        _inside(index.parent, shard)
    return weight_map, shards


def _check_index(names: dict[str, str] | None, found: dict[str, Path]) -> None:
    for name, shard in (names or {}).items():
        if found.get(name, Path()).name != shard:
            raise GraftIOError(
                f"index maps tensor {name!r} to {shard}, which does not hold it; "
                "re-download the checkpoint"
            )


def _open_safetensors(
    path: Path, root: Path | None, files: list[Path], index: dict[str, str] | None
) -> Checkpoint:
    headers: list[Header] = [parse_header(f) for f in files]
    located = [t for h in headers for t in h.tensors]
    if index is not None:
        located = [t for t in located if index.get(t.info.name) == t.info.file.name]
    _check_index(index, {t.info.name: t.info.file for t in located})
    return Checkpoint(
        path,
        root,
        [t.info for t in located],
        offsets={t.info.name: t.offset for t in located},
        file_sizes={f: h.file_size for f, h in zip(files, headers, strict=True)},
        metadata=headers[0].metadata if headers else {},
    )


def _open_torch(
    path: Path, root: Path | None, files: list[Path], index: dict[str, str] | None
) -> Checkpoint:
    infos, loaded = [], {}
    for file in files:
        for name, t in _torch_load(file).items():
            if index is not None and index.get(name) != file.name:
                continue
            nbytes = t.numel() * t.element_size()
            infos.append(TensorInfo(name, t.dtype, tuple(t.shape), nbytes, file))
            loaded[name] = t
    _check_index(index, {i.name: i.file for i in infos})
    return Checkpoint(path, root, infos, loaded=loaded)


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    fd = open_regular(file)
    try:
        # Legacy (pre-1.6, non-zip) torch.save files cannot be memory-mapped; they are read
        # whole, still with weights_only.
        mmap = os.pread(fd, 4, 0) == b"PK\x03\x04"
    except OSError as e:
        raise GraftIOError(f"cannot read {file}: {e.strerror}; check the file") from e
    finally:
        os.close(fd)
    how = "weights_only=True, mmap=True" if mmap else "weights_only=True"
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says all
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(file, weights_only=True, mmap=mmap, map_location="cpu")
    except Exception as e:  # torch.load raises many types; all mean "not a safe weights file"
        raise GraftIOError(
            f"refusing to load {file}: torch.load({how}) failed "
            f"({_reason(e)}); `graft lint {file}` shows what it holds without loading it; "
            "convert it to safetensors where you trust its source"
        ) from e
    if not isinstance(obj, dict):
        raise GraftIOError(
            f"{file} holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise GraftIOError(
                f"{file} is not a flat state dict (entry {_show(key)} is a "
                f"{type(value).__name__}); save model.state_dict() instead"
            )
    return obj


def _reason(e: Exception) -> str:
    """The informative line of a (often multi-paragraph) torch.load error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    line = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0])
    return line if len(line) <= 200 else line[:197] + "..."
