"""GraftDigitsNet: the tiny residual MLP of graft's real-data zoo (plain PyTorch).

An 8x8 image is flattened and embedded to ``hidden_size`` (``embed``), passed through
``num_hidden_layers`` pre-norm residual MLP blocks (``blocks.{i}``: LayerNorm, Linear
D->2D, GELU, Linear 2D->D) and a final LayerNorm (``norm``); the output is the feature
vector. Tensor names follow graft's architecture table: ``embed`` counts as a pre-block
tensor, ``blocks.{i}.`` as block ``i``, ``norm`` as a post-block tensor. Every weight is a
Linear or LayerNorm, so RegMean-style methods see only linear layers.

Classification heads are separate ``nn.Linear(hidden_size, num_classes)`` modules, each
saved as one ``.safetensors`` file (``weight``, ``bias``) whose metadata names its task:
a backbone checkpoint holds the backbone only, so every merge method can merge it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from graft.io import open_checkpoint, save_state_dict, save_statistics

ARCHITECTURE = "GraftDigitsNet"
MODEL_TYPE = "graft-digits"
HEAD_KIND = "classifier_head"  # `graft_statistic` metadata of a head file


def default_config(**overrides) -> dict:
    """The config.json of a GraftDigitsNet; keyword arguments replace defaults.

    Raises:
        ValueError: an unknown key or a non-positive size.
    """
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "intermediate_size": 256,
        "input_size": 64,
        "layer_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(
            f"unknown GraftDigitsNet config keys {sorted(unknown)}; valid: {sorted(config)}"
        )
    config.update(overrides)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "input_size"):
        if not isinstance(config[key], int) or config[key] <= 0:
            raise ValueError(
                f"GraftDigitsNet config {key} must be a positive int, got {config[key]!r}"
            )
    return config


class _Block(nn.Module):
    """Pre-norm residual MLP block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class DigitsBackbone(nn.Module):
    """flatten -> embed -> blocks -> norm; ``forward`` maps (N, 1, 8, 8) to (N, hidden_size)."""

    def __init__(self, config: dict):
        super().__init__()
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embed = nn.Linear(config["input_size"], d)
        self.blocks = nn.ModuleList(
            _Block(d, config["intermediate_size"], eps) for _ in range(config["num_hidden_layers"])
        )
        self.norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


def build_backbone(config: dict) -> nn.Module:
    """A freshly initialised backbone for ``config`` (seed torch first for reproducibility)."""
    _check_config(config, "config")
    return DigitsBackbone(config)


def backbone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the names they are saved with (detached, contiguous)."""
    return {n: t.detach().contiguous() for n, t in module.state_dict().items()}


def save_backbone(
    module: nn.Module, config: dict, path: str | os.PathLike, *, force: bool = False
) -> Path:
    """Atomically write ``config.json`` + ``model.safetensors`` to the directory ``path``."""
    return save_state_dict(backbone_state(module), path, config=config, force=force)


def load_backbone(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a backbone (and its config) from a model directory, e.g. a merge output.

    Raises:
        ValueError: the config is missing or not a GraftDigitsNet, or a tensor is missing,
            unexpected or of the wrong shape.
    """
    with open_checkpoint(path) as ckpt:
        config = ckpt.config
        _check_config(config, f"{path}/config.json")
        module = DigitsBackbone(config)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(ckpt.names))
        extra = sorted(set(ckpt.names) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{path} does not match its GraftDigitsNet config: missing tensors {missing[:3]}, "
                f"unexpected tensors {extra[:3]}; was it saved by graft's digits zoo or merged from it?"
            )
        state = {}
        for name, ref in expected.items():
            t = ckpt.get(name)
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{path}: tensor {name} has shape {tuple(t.shape)}, config implies "
                    f"{tuple(ref.shape)}; the config.json does not describe these weights"
                )
            state[name] = t.float()
    module.load_state_dict(state)
    module.eval()
    return module, config


def save_head(
    head: nn.Linear,
    path: str | os.PathLike,
    *,
    task: str,
    model_fingerprint: str = "",
    force: bool = False,
) -> Path:
    """Atomically write a classification head to one ``.safetensors`` file.

    Args:
        head: the head (``weight`` (C, D), ``bias`` (C,)).
        path: the output file.
        task: the task name, stored as ``task`` metadata.
        model_fingerprint: fingerprint of the backbone the head was trained with, if known.
        force: replace an existing file.
    """
    tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    return save_statistics(
        tensors,
        path,
        kind=HEAD_KIND,
        model_fingerprint=model_fingerprint,
        metadata={"task": task},
        force=force,
    )


def load_head(path: str | os.PathLike) -> nn.Linear:
    """Load a head written by `save_head`; its task name is in ``head.task``.

    Raises:
        ValueError: the file is not a classification head.
    """
    with open_checkpoint(path) as ckpt:
        if ckpt.metadata.get("graft_statistic") != HEAD_KIND or set(ckpt.names) != {
            "weight",
            "bias",
        }:
            raise ValueError(f"{path} is not a graft classification head (written by save_head)")
        weight, bias = ckpt.get("weight").float(), ckpt.get("bias").float()
        task = ckpt.metadata.get("task", "")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    head.task = task
    return head.eval()


def _check_config(config: dict | None, where: str) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{where} is missing; a GraftDigitsNet model dir needs config.json")
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise ValueError(
            f"{where} describes {config.get('architectures')}, not a {ARCHITECTURE}; "
            "pass a model from graft's digits zoo (or merged from it)"
        )
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "input_size", "layer_norm_eps")
    absent = [k for k in keys if k not in config]
    if absent:
        raise ValueError(f"{where} lacks {absent}; rebuild it with default_config()")
