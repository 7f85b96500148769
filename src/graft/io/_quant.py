"""Checkpoints whose stored tensors are decoded as they are read: FP8 weights with their
scales (`graft.io._fp8`) and GGUF files (`graft.io._gguf`). Readers see ordinary float
tensors under Hugging Face names; what is stored stays on disk until a tensor is asked for.

Quantized folders graft cannot decode (bitsandbytes, AWQ, GPTQ...) are refused here with
one line naming what graft reads instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.io._checkpoint import Checkpoint, _pread_into
from graft.io._errors import GraftIOError
from graft.io._format import TensorInfo

# config.json quantization_config.quant_method values for weights graft cannot dequantize:
# packed integer formats whose kernels live in other libraries.
_UNSUPPORTED = {
    "bitsandbytes": "bitsandbytes 4/8-bit",
    "awq": "AWQ",
    "gptq": "GPTQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "hqq": "HQQ",
    "quanto": "quanto",
    "exl2": "EXL2",
    "torchao": "torchao",
    "bitnet": "BitNet",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "mxfp4": "MXFP4",
}
SUPPORTED_QUANTIZED = (
    "FP8 safetensors (quant_method fp8: float8 weights with block or per-tensor "
    "scales) and GGUF files (.gguf)"
)


@dataclass(frozen=True)
class Decoder:
    """How one visible tensor is made from stored ones.

    Attributes:
        info: what readers see (name, dtype and shape after decoding).
        reads: the stored tensors it is decoded from, in the order `decode` takes them.
        decode: stored tensors -> the visible tensor (``info.dtype``, ``info.shape``).
        stored: a short name of the stored format, for ``graft inspect``.
    """

    info: TensorInfo
    reads: tuple[str, ...]
    decode: Callable[..., torch.Tensor]
    stored: str


@dataclass(frozen=True)
class Quantization:
    """What a decoded checkpoint stores, as `Checkpoint.quantization` reports it.

    Attributes:
        method: ``fp8`` or ``gguf``.
        formats: stored format -> how many visible tensors are stored so.
        config: the stored ``quantization_config`` (FP8), or None.
        block: the FP8 scale block ``(rows, cols)``, or None (per-tensor scales, GGUF).
        hidden: stored tensors that are consumed by decoding, not shown (scales).
        notes: what decoding changed or left out, one line each.
    """

    method: str
    formats: Mapping[str, int]
    config: Mapping | None = None
    block: tuple[int, int] | None = None
    hidden: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for ``graft inspect``: method, formats, and what was left out."""
        parts = ", ".join(f"{fmt}: {n}" for fmt, n in sorted(self.formats.items()))
        return "; ".join((f"{self.method} ({parts})", "dequantized as read", *self.notes))


class DecodedCheckpoint(Checkpoint):
    """A `Checkpoint` whose listed tensors may be decoded from differently stored ones.

    ``names``/``info`` describe the decoded tensors; `get` reads the stored bytes (one
    ``pread`` each, as `Checkpoint` does) and decodes them, so memory holds only the
    tensors in flight. `quantization` says what is stored; `config` is the config of the
    decoded model (given, not read from ``root``).
    """

    def __init__(
        self,
        path: Path,
        root: Path | None,
        infos: list[TensorInfo],
        *,
        stored: Mapping[str, tuple[TensorInfo, int]],
        decoders: Mapping[str, Decoder],
        file_sizes: dict[Path, int],
        metadata: dict[str, str] | None,
        quantization: Quantization,
        config: dict | None,
    ):
        super().__init__(
            path,
            root,
            infos,
            offsets={name: off for name, (_, off) in stored.items()},
            file_sizes=file_sizes,
            metadata=metadata,
        )
        self._stored = {name: info for name, (info, _) in stored.items()}
        self._decoders = dict(decoders)
        self.quantization = quantization
        self._config, self._config_read = config, True  # what the decoded tensors make

    def __repr__(self) -> str:
        return f"DecodedCheckpoint({str(self.path)!r}, {len(self)} tensors, {self.quantization.method})"

    def stored_format(self, name: str) -> str | None:
        """The stored format of tensor ``name`` (``float8_e4m3fn 128x128 blocks``, ``Q4_1``...),
        or None when it is stored as it reads."""
        self.info(name)
        d = self._decoders.get(name)
        return d.stored if d is not None else None

    def get(self, name: str) -> torch.Tensor:
        d = self._decoders.get(name)
        if d is None:
            return super().get(name)
        self.info(name)
        if self._closed:
            raise GraftIOError(f"checkpoint {self.path} is closed; open it again to read {name!r}")
        return d.decode(*(self._read_stored(n) for n in d.reads))

    def get_prefix(self, name: str, nbytes: int) -> torch.Tensor:
        d = self._decoders.get(name)
        if d is None:
            return super().get_prefix(name, nbytes)
        self.info(name)
        first = self._stored[d.reads[0]]
        n = min(nbytes, first.nbytes)
        out = torch.empty(n, dtype=torch.uint8)
        if n:
            _pread_into(self._fd(first.file), out, self._offsets[first.name], first.file)
        return out

    def _reads_whole(self, name: str) -> bool:
        return name in self._decoders

    def _stored_info(self, name: str) -> TensorInfo:
        return self._stored[name]

    def _read_stored(self, name: str) -> torch.Tensor:
        info = self._stored[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            _pread_into(self._fd(info.file), out, self._offsets[name], info.file)
        return out


def check_quantization_config(config: dict | None, where: Path) -> str | None:
    """The ``quant_method`` of a config.json, once checked to be one graft decodes.

    Raises:
        GraftIOError: the folder is quantized in a format graft does not read.
    """
    qc = (config or {}).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if not isinstance(method, str):
        raise GraftIOError(
            f"{where}: quantization_config has no quant_method string; fix config.json"
        )
    method = method.lower()
    if method in ("fp8", "fbgemm_fp8"):
        return method
    if method == "compressed-tensors" and qc.get("format") == "float-quantized":
        return method  # float8 weights with weight_scale tensors; packed int formats are not
    what = _UNSUPPORTED.get(method, f"quant_method {method!r}")
    raise GraftIOError(
        f"{where} holds {what} quantized weights, which graft cannot dequantize; graft reads "
        f"{SUPPORTED_QUANTIZED}: pass the unquantized (or FP8/GGUF) model instead"
    )
