"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from graft.io._checkpoint import Checkpoint, open_checkpoint
from graft.io._errors import GraftIOError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


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
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GraftIOError(f"cannot parse {cfg_path}: {e}; fix or re-save the adapter") from e
    if not isinstance(config, dict):
        raise GraftIOError(f"{cfg_path} is not a JSON object; fix or re-save the adapter")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise GraftIOError(
            f"{d} is a {kind or 'unknown'} adapter; graft applies LoRA adapters only"
        )
    r = config.get("r")
    if not isinstance(r, int) or r <= 0 or not isinstance(config.get("lora_alpha"), int | float):
        raise GraftIOError(f"{cfg_path} lacks a positive integer r or a numeric lora_alpha")
    weights = next((d / n for n in ADAPTER_WEIGHTS if (d / n).is_file()), None)
    if weights is None:
        raise GraftIOError(
            f"{d} has no adapter weights (expected {' or '.join(ADAPTER_WEIGHTS)}); "
            "re-save the adapter"
        )
    return Adapter(d, config, open_checkpoint(weights))
