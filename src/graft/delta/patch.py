"""Delta and patch files, and PEFT LoRA adapters, read as one thing: a per-tensor delta.

A graft delta/patch is one ``.safetensors`` file. Its ``__metadata__`` says what it is:

* ``graft_delta``: the format version (``1``);
* ``graft_delta_method``: ``dense`` (from `graft diff`), ``compeft``, ``dare``, ``lowrank``;
* ``graft_base`` / ``graft_base_fingerprint``: the base it was taken against and its
  content hash (`Checkpoint.fingerprint`), checked when the delta is applied;
* ``graft_finetuned`` / ``graft_finetuned_fingerprint``: the fine-tuned model;
* ``graft_dtype``: the dtype of the delta values (the fine-tune's unless asked);
* ``graft_params``: the compressor's parameters (JSON);
* ``graft_layout``: JSON ``{tensor: {"codec": ..., "shape": [...]}}``, see `codecs`;
* ``graft_shared`` (EMR task patches only): the name of a graft delta file in the same
  folder holding the parts this patch shares with others (`codecs.SHARED_PARTS`); it must
  record the same base.

`open_delta` checks the layout against the stored tensors (every part present with the
shape its codec needs), so a corrupt or hand-edited patch fails before anything is read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft.delta import codecs
from graft.delta._bits import packed_size, unpack_bits
from graft.io import Checkpoint, is_adapter_dir, is_model_dir, open_adapter, open_checkpoint
from graft.plan.plan import PlanError

FORMAT_VERSION = "1"
ADAPTER_PREFIX = "base_model.model."


class DeltaError(PlanError):
    """A delta, patch or adapter does not fit the models or files it is used with."""


@dataclass(frozen=True)
class Entry:
    """How one tensor's delta is stored.

    Attributes:
        shape: the tensor's shape in the model.
        codec: a key of `codecs.PARTS`.
        parts: part -> stored tensor name.
        scale: multiplies the decoded delta (LoRA's alpha / r).
        transpose: the stored factors describe the transposed tensor (GPT-2's Conv1D).
    """

    shape: tuple[int, ...]
    codec: str
    parts: dict[str, str]
    scale: float = 1.0
    transpose: bool = False


@dataclass
class Delta:
    """An opened delta, patch or adapter: `layout` says how each tensor is stored and
    `delta(name)` decodes one, reading only that tensor's parts."""

    path: Path
    file: Checkpoint
    method: str
    layout: dict[str, Entry]
    metadata: dict[str, str] = field(default_factory=dict)
    shared: Checkpoint | None = None  # the ``graft_shared`` file, when the patch names one

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("graft_base_fingerprint")

    @property
    def params(self) -> dict:
        return json.loads(self.metadata.get("graft_params", "{}"))

    def nbytes(self, name: str) -> int:
        """Bytes stored for tensor ``name`` (all its parts)."""
        entry = self.layout[name]
        return sum(self._holder(entry, p).info(s).nbytes for p, s in entry.parts.items())

    def read_parts(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.layout[name]
        return {p: self._holder(entry, p).get(s) for p, s in entry.parts.items()}

    def _holder(self, entry: Entry, part: str) -> Checkpoint:
        if self.shared is not None and part in codecs.SHARED_PARTS.get(entry.codec, ()):
            return self.shared
        return self.file

    def replacement(self, name: str) -> torch.Tensor:
        """The stored value of a ``replace`` entry."""
        return self.file.get(self.layout[name].parts[""])

    def delta(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 delta of tensor ``name``, on ``device``.

        Raises:
            DeltaError: the stored parts are inconsistent (a corrupt patch).
        """
        entry = self.layout[name]
        parts = {k: v.to(device) for k, v in self.read_parts(name).items()}
        self._check_counts(name, entry, parts)
        stored_shape = entry.shape[::-1] if entry.transpose else entry.shape
        out = codecs.decode(entry.codec, parts, stored_shape)
        if entry.transpose:
            out = out.T
        if entry.scale != 1.0:
            out = out * entry.scale
        return out.to(device).reshape(entry.shape)

    def _check_counts(self, name: str, entry: Entry, parts: dict[str, torch.Tensor]) -> None:
        if entry.codec not in ("sparse", "ternary"):
            return
        kept = int(unpack_bits(parts["mask"], math.prod(entry.shape)).sum())
        if entry.codec == "sparse" and parts["values"].numel() != kept:
            raise self._corrupt(f"{name} keeps {kept} entries but stores {parts['values'].numel()}")
        if entry.codec == "ternary" and parts["sign"].numel() != packed_size(kept):
            raise self._corrupt(
                f"{name} keeps {kept} entries but stores {parts['sign'].numel()} sign bytes"
            )

    def _corrupt(self, why: str) -> DeltaError:
        return DeltaError(f"corrupt patch {self.path}: {why}; re-create it with graft compress")

    def close(self) -> None:
        self.file.close()
        if self.shared is not None:
            self.shared.close()


def open_delta(path: str | os.PathLike) -> Delta:
    """Open a graft delta/patch file or a PEFT LoRA adapter folder (headers only).

    Raises:
        DeltaError: not a graft delta or adapter, or its layout does not match its tensors.
        GraftIOError: the file is missing, truncated or corrupt.
    """
    p = Path(path)
    if p.is_dir() and is_adapter_dir(p):
        return _open_adapter(p)
    if p.is_dir():
        if is_model_dir(p):
            raise DeltaError(
                f"{p} is a model folder, not a delta or PEFT adapter; "
                f"`graft diff {p} BASE -o DELTA.safetensors` makes a delta from it"
            )
        raise DeltaError(
            f"{p} is a folder but not a PEFT adapter; give a delta file from `graft diff`"
        )
    ckpt = open_checkpoint(p)
    shared = None
    try:
        shared = _open_shared(p, ckpt.metadata)
        return _open_file(p, ckpt, shared)
    except BaseException:
        ckpt.close()
        if shared is not None:
            shared.close()
        raise


def _open_shared(p: Path, meta: dict[str, str]) -> Checkpoint | None:
    """The ``graft_shared`` file a patch names (a plain file name in its folder), checked
    to record the patch's base."""
    name = meta.get("graft_shared")
    if name is None:
        return None
    if not name or name in (".", "..") or Path(name).name != name:
        raise DeltaError(f"corrupt patch {p}: graft_shared {name!r} is not a file name")
    path = p.parent / name
    if not path.is_file():
        raise DeltaError(
            f"patch {p} reads its shared values from {path}, which is missing; keep the "
            "folder graft wrote together (an EMR merge's emr/ folder)"
        )
    shared = open_checkpoint(path)
    if shared.metadata.get("graft_base_fingerprint") != meta.get("graft_base_fingerprint"):
        shared.close()
        raise DeltaError(
            f"patch {p} and its shared file {path} record different bases; they come from "
            "different merges: re-run the merge"
        )
    return shared


def _open_file(p: Path, ckpt: Checkpoint, shared: Checkpoint | None = None) -> Delta:
    meta = ckpt.metadata
    if "graft_delta" not in meta:
        raise DeltaError(
            f"{p} is not a graft delta or patch (no graft_delta metadata); "
            "make one with `graft diff FT BASE -o DELTA`"
        )
    if meta["graft_delta"] != FORMAT_VERSION:
        raise DeltaError(f"{p} is graft delta format {meta['graft_delta']}; this graft reads 1")
    corrupt = lambda why: DeltaError(f"corrupt patch {p}: {why}; re-create it")  # noqa: E731
    try:
        raw = json.loads(meta.get("graft_layout", ""))
        layout = {
            name: Entry(tuple(int(d) for d in e["shape"]), str(e["codec"]), {})
            for name, e in raw.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise corrupt(f"unreadable graft_layout ({e})") from None
    for name, entry in layout.items():
        if entry.codec not in codecs.PARTS:
            raise corrupt(f"tensor {name} has unknown codec {entry.codec!r}")
        for part, shape in codecs.expected_parts(entry.codec, entry.shape).items():
            holder = ckpt
            if part in codecs.SHARED_PARTS.get(entry.codec, ()):
                if shared is None:
                    raise corrupt(f"tensor {name} needs a graft_shared file, which it lacks")
                holder = shared
            stored = codecs.part_name(name, part, entry.codec)
            if stored not in holder:
                raise corrupt(f"part {stored!r} of tensor {name} is missing")
            have = tuple(holder.info(stored).shape)
            if shape is not None and have != tuple(shape):
                raise corrupt(f"part {stored!r} has shape {have}, its codec needs {tuple(shape)}")
            dtype = holder.info(stored).dtype
            if part in _VALUE_PARTS and entry.codec != "replace" and not dtype.is_floating_point:
                shown = str(dtype).removeprefix("torch.")
                raise corrupt(f"part {stored!r} is {shown}; a delta's values are floats")
            entry.parts[part] = stored
        if entry.codec == "lowrank":
            _check_factors(name, entry, ckpt, corrupt)
    method = meta.get("graft_delta_method", "dense")
    return Delta(p, ckpt, method, layout, dict(meta), shared)


# Parts holding a delta's numbers (the rest are bit masks); ``replace`` entries are the
# fine-tune's own tensors, integer buffers included.
_VALUE_PARTS = ("", "values", "scale", "B", "A")


def _check_factors(name, entry: Entry, ckpt: Checkpoint, corrupt) -> None:
    b, a = (tuple(ckpt.info(entry.parts[k]).shape) for k in ("B", "A"))
    rows, cols = (entry.shape[1], entry.shape[0]) if entry.transpose else entry.shape[:2]
    if (
        len(entry.shape) != 2
        or len(b) != 2
        or len(a) != 2
        or b[1] != a[0]
        or (b[0], a[1]) != (rows, cols)
    ):
        raise corrupt(f"factors of {name} are {b} and {a}, which do not make {entry.shape}")


# --- PEFT LoRA adapters ----------------------------------------------------------------


def adapter_module(key: str) -> tuple[str, str] | None:
    """``(module, "A"|"B")`` of a PEFT LoRA key, or None for any other key."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    return (m.group(1), m.group(2)) if m else None


def lora_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling for ``module``: alpha / r (alpha / sqrt(r) with rsLoRA), with the
    per-module ``rank_pattern`` / ``alpha_pattern`` overrides PEFT matches by suffix."""

    def pattern(key: str, default):
        for pat, value in (config.get(key) or {}).items():
            if re.fullmatch(rf"(.*\.)?{pat}", module):
                return value
        return default

    r = pattern("rank_pattern", config["r"])
    alpha = pattern("alpha_pattern", config["lora_alpha"])
    del rank  # the stored factor's rank equals r for adapters PEFT wrote
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _open_adapter(d: Path) -> Delta:
    adapter = open_adapter(d)
    ckpt, config = adapter.weights, adapter.config
    try:
        if config.get("use_dora"):
            raise DeltaError(f"{d} is a DoRA adapter; graft applies plain LoRA adapters only")
        found: dict[str, dict[str, str]] = {}
        for key in ckpt.names:
            hit = adapter_module(key)
            if hit is None:
                raise DeltaError(
                    f"adapter {d} holds {key}, which is not a LoRA A/B weight (embedding LoRA, "
                    "modules_to_save and biases are not supported); merge it with PEFT instead"
                )
            found.setdefault(hit[0], {})[hit[1]] = key
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        layout = {}
        for module, parts in found.items():
            if set(parts) != {"A", "B"}:
                raise DeltaError(f"adapter {d}: module {module} lacks lora_A or lora_B")
            b, a = (tuple(ckpt.info(parts[k]).shape) for k in ("B", "A"))
            if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
                raise DeltaError(f"adapter {d}: factors of {module} are {b} and {a}")
            shape = (a[1], b[0]) if fan_in_fan_out else (b[0], a[1])
            layout[f"{module}.weight"] = Entry(
                shape, "lowrank", parts, lora_scale(config, module, a[0]), fan_in_fan_out
            )
    except BaseException:
        adapter.close()
        raise
    meta = {"graft_base": str(config.get("base_model_name_or_path") or "")}
    return Delta(d, ckpt, "lora", layout, meta)
