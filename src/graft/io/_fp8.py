"""FP8 checkpoints: float8 weights plus the scales that dequantize them.

Layouts read (the scale sits beside its weight, as DeepSeek-V3, Qwen3-FP8 and transformers'
FineGrainedFP8 write them, or as compressed-tensors / FBGEMM write per-tensor and
per-channel scales):

* ``X.weight`` float8 (R, C) with ``X.weight_scale_inv`` float32 (⌈R/bm⌉, ⌈C/bn⌉), block
  ``[bm, bn]`` from ``quantization_config.weight_block_size`` (default 128×128):
  ``w[i, j] = float(q[i, j]) * scale_inv[i // bm, j // bn]``. Edge blocks are ragged: the
  last block row/column covers what is left, the scale grid rounds up (DeepSeek's
  ``weight_dequant`` and transformers' ``FP8Linear`` use the same grid).
* the same with a scalar scale (per-tensor FP8), or a scale of shape (R, 1) / (R,)
  (per output channel); named ``X.weight_scale_inv`` or ``X.weight_scale``. Both are
  multipliers: the names differ only in what the quantizer divided by.
* scales stored as ``float8_e8m0fnu`` or as uint8 exponents (``scale_fmt: ue8m0``):
  ``2 ** (byte - 127)``.

Scales (and static activation scales, ``X.input_scale`` / ``X.activation_scale``) are
consumed by decoding and never listed. Weights decode in float32 and are returned in the
config's ``torch_dtype`` (bfloat16 unless it says float16 or float32).

Writing FP8 (`quantize_fp8`): per block, ``scale_inv = amax / 448`` (448 is e4m3's largest
finite value; an all-zero block gets 1) and ``q = clamp(w / scale_inv, ±448)`` rounded to
nearest by the cast, so ``|w − q·scale_inv| ≤ 2⁻⁴·|w| + 2⁻¹⁰·scale_inv``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from graft.io._checkpoint import Checkpoint
from graft.io._errors import GraftIOError
from graft.io._format import TensorInfo
from graft.io._quant import DecodedCheckpoint, Decoder, Quantization

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
DEFAULT_FP8_BLOCK = (128, 128)
_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_ACTIVATION_SCALES = ("input_scale", "activation_scale")
_OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fp8_scale_name(name: str) -> str:
    """The ``weight_scale_inv`` tensor that goes with FP8 weight ``name``."""
    return name + "_scale_inv"


def fp8_scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The block-scale grid of a weight: leading dims kept, the last two rounded up."""
    *lead, r, c = shape
    return (*lead, math.ceil(r / block[0]), math.ceil(c / block[1]))


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> torch.Tensor:
    """Float32 weights from float8 ``q`` and its scale: a scalar (per tensor), one per row
    (``(R, 1)`` or ``(R,)``), or a ``block`` grid (ragged edge blocks, see the module doc).

    The block case broadcasts each scale over its block through views of the result
    (no second weight-sized tensor).
    """
    w = q.to(torch.float32)
    s = _scale_values(scale)
    if block is None or s.numel() == 1 or w.dim() < 2:
        if s.dim() == 1 and w.dim() >= 2 and s.numel() > 1:
            s = s[:, None]
        return w.mul_(s)
    bm, bn = block
    r, c = w.shape[-2:]
    rows = s.repeat_interleave(bm, dim=-2)[..., :r, :]  # (..., R, ⌈C/bn⌉): small
    full = c // bn
    if full:
        w[..., : full * bn].unflatten(-1, (full, bn)).mul_(rows[..., :full, None])
    if full * bn < c:
        w[..., full * bn :].mul_(rows[..., full:])
    return w


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)``: float8_e4m3fn weights and float32 block scales such that
    `dequantize_fp8` gives ``w`` back within e4m3's rounding (see the module doc).

    Args:
        w: a float tensor of at least 2 dimensions; blocks tile its last two.
        block: ``(rows, cols)`` per scale; edge blocks are ragged.
    """
    x = w.to(torch.float32, copy=True)
    bm, bn = block
    r, c = x.shape[-2:]
    full = c // bn
    parts = []
    if full:
        parts.append(x[..., : full * bn].unflatten(-1, (full, bn)).abs().amax(dim=-1))
    if full * bn < c:
        parts.append(x[..., full * bn :].abs().amax(dim=-1, keepdim=True))
    col_max = torch.cat(parts, dim=-1)  # (..., R, ⌈C/bn⌉)
    pad = -r % bm
    if pad:
        col_max = torch.nn.functional.pad(col_max, (0, 0, 0, pad))
    amax = col_max.unflatten(-2, (col_max.shape[-2] // bm, bm)).amax(dim=-2)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    inv = (1.0 / scale_inv).repeat_interleave(bm, dim=-2)[..., :r, :]
    if full:
        x[..., : full * bn].unflatten(-1, (full, bn)).mul_(inv[..., :full, None])
    if full * bn < c:
        x[..., full * bn :].mul_(inv[..., full:])
    q = x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # ue8m0 exponents stored as bytes
        return torch.exp2(scale.to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def open_fp8(ckpt: Checkpoint, method: str | None) -> Checkpoint:
    """``ckpt`` seen dequantized, when it holds float8 weights with scales; else ``ckpt``.

    Args:
        ckpt: a safetensors checkpoint as stored.
        method: its config's ``quant_method`` (already checked), or None.

    Raises:
        GraftIOError: a scale whose shape fits neither the block grid, one per row nor one
            per tensor.
    """
    if ckpt._loaded is not None:
        return ckpt
    infos = {n: ckpt.info(n) for n in ckpt.names}
    qc = dict((ckpt.config or {}).get("quantization_config") or {}) if method else {}
    block = _block(qc, ckpt.path)
    fp8 = [
        n
        for n, i in infos.items()
        if i.dtype in FP8_DTYPES and any(n + s in infos for s in _SCALE_SUFFIXES)
    ]
    if not fp8 and method is None:
        return ckpt
    out_dtype = _out_dtype(ckpt.config)
    hidden: set[str] = set()
    decoders: dict[str, Decoder] = {}
    formats: Counter = Counter()
    for name in fp8:
        sname = next(name + s for s in _SCALE_SUFFIXES if name + s in infos)
        w_info, s_info = infos[name], infos[sname]
        kind, use = _scale_kind(w_info, s_info, block)
        stem = name.rsplit(".", 1)[0] + "." if "." in name else ""
        hidden.add(sname)
        hidden.update(stem + a for a in _ACTIVATION_SCALES if stem + a in infos)
        visible = TensorInfo(
            name, out_dtype, w_info.shape, w_info.numel * out_dtype.itemsize, w_info.file
        )
        stored = f"{str(w_info.dtype).removeprefix('torch.')} {kind}"
        formats[stored] += 1
        decoders[name] = Decoder(visible, (name, sname), _decoder(use, out_dtype), stored)
    located = {n: (infos[n], ckpt._offsets[n]) for n in ckpt.names}
    listed = [
        decoders[n].info if n in decoders else infos[n] for n in ckpt.names if n not in hidden
    ]
    config = _dequantized_config(ckpt.config, out_dtype)
    view = DecodedCheckpoint(
        ckpt.path,
        ckpt.root,
        listed,
        stored=located,
        decoders=decoders,
        file_sizes=dict(ckpt._file_sizes),
        metadata=ckpt.metadata,
        quantization=Quantization("fp8", dict(formats), qc or None, block, tuple(sorted(hidden))),
        config=config,
    )
    view.modules_root = ckpt.modules_root
    ckpt.close()
    return view


def _decoder(block: tuple[int, int] | None, dtype: torch.dtype):
    return lambda q, s: dequantize_fp8(q, s, block).to(dtype)


def _block(qc: dict, where) -> tuple[int, int] | None:
    raw = qc.get("weight_block_size", DEFAULT_FP8_BLOCK) if qc else DEFAULT_FP8_BLOCK
    if raw is None:
        return None
    if (
        not isinstance(raw, list | tuple)
        or len(raw) != 2
        or not all(type(b) is int and b > 0 for b in raw)
    ):
        raise GraftIOError(
            f"{where}: quantization_config.weight_block_size is {raw!r}, expected two positive "
            "whole numbers such as [128, 128]; fix config.json"
        )
    return (raw[0], raw[1])


def _scale_kind(
    w: TensorInfo, s: TensorInfo, block: tuple[int, int] | None
) -> tuple[str, tuple[int, int] | None]:
    """How scale ``s`` maps onto weight ``w``: (label, block or None)."""
    if math.prod(s.shape) == 1:
        return "per-tensor", None
    if (
        block is not None
        and len(w.shape) >= 2
        and tuple(s.shape) == fp8_scale_shape(w.shape, block)
    ):
        return f"{block[0]}x{block[1]} blocks", block
    if len(w.shape) == 2 and tuple(s.shape) in ((w.shape[0], 1), (w.shape[0],)):
        return "per-channel", None
    bm, bn = block or DEFAULT_FP8_BLOCK
    grid = f", a {fp8_scale_shape(w.shape, (bm, bn))} grid" if len(w.shape) >= 2 else ""
    raise GraftIOError(
        f"FP8 weight {w.name} {tuple(w.shape)} has scale {s.name} of shape {tuple(s.shape)}; "
        f"graft reads one scale per tensor, per row or per {bm}x{bn} block{grid}; check "
        "quantization_config.weight_block_size in config.json"
    )


def _out_dtype(config: dict | None) -> torch.dtype:
    name = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return _OUT_DTYPES.get(name, torch.bfloat16) if isinstance(name, str) else torch.bfloat16


def _dequantized_config(config: dict | None, dtype: torch.dtype) -> dict | None:
    """The config of the dequantized model: no quantization_config, the float dtype."""
    if config is None:
        return None
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    name = str(dtype).removeprefix("torch.")
    out["torch_dtype"] = name
    if "dtype" in out:
        out["dtype"] = name
    return out


def fp8_config(source: dict | None, block: tuple[int, int]) -> dict:
    """The ``quantization_config`` of an FP8 output with ``block`` scales: the source's
    (its ``modules_to_not_convert``...) when it had one, else transformers' defaults."""
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if source and source.get("quant_method") == "fp8":
        qc.update(source)
    qc["weight_block_size"] = list(block)
    return qc
