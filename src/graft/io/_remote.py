"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``file://``...), for merges whose
inputs sit on object storage every node of a cluster reads.

A safetensors file or a Hugging Face folder of them is read as locally: headers first
(two byte-range reads per file), then one range read per tensor, nothing cached. The
folder's small side files (config, tokenizer, generation config) are copied to a local
temporary folder that serves as `Checkpoint.root`, so configs, tokenizers and model cards
work unchanged; it is removed on `close`. Torch ``.bin`` files are not read from URLs
(unpickling them needs a local, memory-mapped file): convert them to safetensors first.
Needs ``fsspec`` (``graft[ray]``) and the filesystem's own package (``s3fs`` for ``s3://``,
``graft[s3]``); credentials and endpoints come from that package's usual configuration
(for S3: ``AWS_*`` variables, ``~/.aws``, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import torch

from graft.io._checkpoint import Checkpoint
from graft.io._errors import GraftIOError
from graft.io._format import decode_header

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
_MAX_SIDE_FILE = 64 * 2**20  # a tokenizer.json is a few MB; anything larger is not a side file


def is_url(path: object) -> bool:
    """True for ``scheme://...`` strings (fsspec URLs), False for local paths."""
    return isinstance(path, str) and bool(_URL.match(path))


def open_url(url: str) -> UrlCheckpoint:
    """Open the safetensors file or Hugging Face folder at ``url`` (headers only).

    Raises:
        GraftIOError: fsspec or the URL's filesystem package is missing, the URL cannot be
            read, or it holds no safetensors checkpoint.
    """
    try:
        import fsspec
    except ImportError:
        raise GraftIOError(f"reading {url} needs fsspec; pip install 'graft[ray]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise GraftIOError(
            f"cannot read {url}: {e}; install its fsspec filesystem (pip install "
            "'graft[s3]' for s3://)"
        ) from None
    path = path.rstrip("/")
    try:
        return _open(url, fs, path)
    except OSError as e:  # fsspec backends raise OSError subclasses (FileNotFoundError...)
        raise GraftIOError(f"cannot read {url}: {e}; check the URL and credentials") from None


def _open(url: str, fs, path: str) -> UrlCheckpoint:
    if path.endswith(".safetensors"):
        files, index, root = [path], None, None
    else:
        index_path = f"{path}/model.safetensors.index.json"
        if fs.exists(index_path):
            weight_map = json.loads(fs.cat_file(index_path)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and PurePosixPath(f).name == f for f in weight_map.values()
            ):
                raise GraftIOError(f"{url}/model.safetensors.index.json has no valid weight_map")
            files = [f"{path}/{f}" for f in sorted(set(weight_map.values()))]
            index = weight_map
        elif fs.exists(f"{path}/model.safetensors"):
            files, index = [f"{path}/model.safetensors"], None
        else:
            raise GraftIOError(
                f"no safetensors checkpoint at {url}: expected model.safetensors or "
                "model.safetensors.index.json (torch .bin files are not read from URLs)"
            )
        root = _side_files(fs, path)
    infos, offsets, sizes, metadata = [], {}, {}, {}
    for i, file in enumerate(files):
        size = fs.size(file)
        header = decode_header(
            Path(file), size, lambda s, n, f=file: fs.cat_file(f, start=s, end=s + n)
        )
        sizes[Path(file)] = size
        metadata = header.metadata if i == 0 else metadata
        for t in header.tensors:
            if index is None or index.get(t.info.name) == PurePosixPath(file).name:
                infos.append(t.info)
                offsets[t.info.name] = t.offset
    return UrlCheckpoint(url, fs, root, infos, offsets=offsets, file_sizes=sizes, metadata=metadata)


def _side_files(fs, path: str) -> Path:
    """Copy the folder's small non-weight files to a local temporary folder."""
    local = Path(tempfile.mkdtemp(prefix="graft-url-"))
    for entry in fs.ls(path, detail=True):
        name = PurePosixPath(entry["name"]).name
        if (
            entry.get("type") == "file"
            and not name.endswith(_WEIGHTS)
            and (entry.get("size") or 0) <= _MAX_SIDE_FILE
        ):
            (local / name).write_bytes(fs.cat_file(entry["name"]))
    return local


class UrlCheckpoint(Checkpoint):
    """A `Checkpoint` whose tensors are byte ranges of files behind an fsspec URL."""

    def __init__(self, url: str, fs, root: Path | None, infos, **kwargs):
        super().__init__(url, root, infos, **kwargs)  # type: ignore[arg-type]
        self._fs = fs
        self._local_root = root

    def __reduce__(self):
        return (open_url, (self.path,))

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        if self._closed:
            raise GraftIOError(f"checkpoint {self.path} is closed; open it again to read {name!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        data = bytearray(self._range(name, info.nbytes))
        return torch.frombuffer(data, dtype=torch.uint8).view(info.dtype).reshape(info.shape)

    def get_prefix(self, name: str, nbytes: int) -> torch.Tensor:
        n = min(nbytes, self.info(name).nbytes)
        return (
            torch.frombuffer(bytearray(self._range(name, n)), dtype=torch.uint8)
            if n
            else (torch.empty(0, dtype=torch.uint8))
        )

    def _range(self, name: str, n: int) -> bytes:
        info, start = self.info(name), self._offsets[name]
        data = self._fs.cat_file(str(info.file), start=start, end=start + n)
        if len(data) != n:
            raise GraftIOError(f"{info.file} ended early while reading; the file is truncated")
        return data

    def close(self) -> None:
        super().close()
        if self._local_root is not None:
            shutil.rmtree(self._local_root, ignore_errors=True)
            self._local_root = None
