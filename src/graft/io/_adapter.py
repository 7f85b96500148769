"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from graft.io._checkpoint import Checkpoint, open_checkpoint
from graft.io._errors import GraftIOError
from graft.io._readers import _show, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# LoRA ranks are at most a few thousand; alpha is a scale of similar size.
MAX_RANK = 1_000_000
MAX_ALPHA = 1e9


@dataclass
class Adapter:
    """An opened LoRA adapter: its config and a lazy reader of its weights.

    Attributes:
        path: the adapter folder.
        config: the parsed ``adapter_config.json``.
        weights: ``adapter_model.safetensors`` (or ``.bin``), opened lazily.
    """

    path: Path
    config: dict
    weights: Checkpoint

    def close(self) -> None:
        self.weights.close()


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def open_adapter(path: str | os.PathLike) -> Adapter:
    """Open a PEFT LoRA adapter folder (headers only).

    Raises:
        GraftIOError: the folder, its config or its weights are missing or unreadable, or
            the adapter is not a LoRA adapter graft can apply.
    """
    d = Path(path)
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise GraftIOError(
            f"{d} is not a PEFT adapter folder ({ADAPTER_CONFIG} missing); "
            "give the folder that `save_pretrained` wrote"
        )
    config = read_json(cfg_path, fix="fix or re-save the adapter")
    if not isinstance(config, dict):
        raise GraftIOError(f"{cfg_path} is not a JSON object; fix or re-save the adapter")
    kind = config.get("peft_type")
    if kind != "LORA":
        ok = isinstance(kind, str) and kind.isprintable() and 0 < len(kind) <= 40
        raise GraftIOError(
            f"{d} is a {kind if ok else 'unknown'} adapter; graft applies LoRA adapters only"
        )
    _check_lora_config(config, cfg_path)
    weights = next((d / n for n in ADAPTER_WEIGHTS if (d / n).is_file()), None)
    if weights is None:
        raise GraftIOError(
            f"{d} has no adapter weights (expected {' or '.join(ADAPTER_WEIGHTS)}); "
            "re-save the adapter"
        )
    return Adapter(d, config, open_checkpoint(weights))


def _check_lora_config(config: dict, path: Path) -> None:
    """The fields graft applies an adapter with: r, lora_alpha and their per-module
    overrides (``rank_pattern`` / ``alpha_pattern``: module-name regex -> number)."""
    fix = "fix or re-save the adapter"
    if not _is_rank(config.get("r")) or not _is_alpha(config.get("lora_alpha")):
        raise GraftIOError(
            f"{path} lacks a positive integer r (at most {MAX_RANK:,}) or a finite numeric "
            f"lora_alpha; {fix}"
        )
    for key, valid in (("rank_pattern", _is_rank), ("alpha_pattern", _is_alpha)):
        table = config.get(key)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise GraftIOError(f"{path}: {key} is {_show(table)}, expected an object; {fix}")
        for pattern, value in table.items():
            try:
                re.compile(rf"(.*\.)?{pattern}")  # as graft.delta.patch.lora_scale matches
            except (re.error, RecursionError, OverflowError):
                raise GraftIOError(
                    f"{path}: {key} key {_show(pattern)} is not a valid pattern; {fix}"
                ) from None
            if not valid(value):
                raise GraftIOError(
                    f"{path}: {key}[{_show(pattern)}] is {_show(value)}, expected a positive "
                    f"{'integer' if valid is _is_rank else 'finite number'}; {fix}"
                )


def _is_rank(r: object) -> bool:
    return type(r) is int and 0 < r <= MAX_RANK


def _is_alpha(a: object) -> bool:
    return type(a) in (int, float) and math.isfinite(a) and abs(a) <= MAX_ALPHA
