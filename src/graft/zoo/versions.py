"""A second version of the zoo's base, for transferring fine-tunes across base versions.

The zoo's base (v1) was pretrained on the 500 upright digits of the pretrain split. Base
v2 is v1 *continued*: trained further, backbone and pretraining head, on more data from
another domain: the upright digits of the pretrain **and** train splits (1,100 images;
never a test or validation image; the tasks see the train images only transformed, except
mirror-detection's unmirrored half), each moved by one pixel with probability 0.5. Its
weights move far from v1's, as a new release of a base model does, while staying in the
same basin (it starts from v1), which is the setting of Fine-tuning Transfer (Lin et al.
2025) and PortLLM (Khan et al. 2025).

Two presets (`V2_PRESETS`): a *minor* release (5 epochs at lr 1e-3) and a *major* one
(40 epochs at lr 2e-3), to show how transfer degrades as the versions drift apart.

Nothing here changes the zoo itself: `build_base_v2` writes beside it, from the zoo's
seed, and `finetune` repeats the zoo's own probe + fine-tune recipe on any backbone, so
"fine-tuned on v2 directly" is the same recipe as the v1 fine-tunes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graft.models.digits_net import load_backbone, load_head, save_backbone, save_head
from graft.zoo._train import probe, train
from graft.zoo.build import FULL, BuildConfig, Zoo
from graft.zoo.tasks import TASKS, pretrain_data, split_indices, task_data


@dataclass(frozen=True)
class V2Config:
    """How base v2 continues base v1 (v2 is rebuilt on request, never cached)."""

    epochs: int = 40
    lr: float = 2e-3
    shift: float = 0.5
    batch_size: int = 64


# Two releases: a minor one (a short continuation) and a major one (a long one).
V2_PRESETS = {
    "minor": V2Config(epochs=5, lr=1e-3),
    "major": V2Config(epochs=40, lr=2e-3),
}


def build_base_v2(
    zoo: Zoo, out: str | os.PathLike, *, config: V2Config = V2_PRESETS["major"], force: bool = False
) -> Path:
    """Write base v2 (``out/`` model dir, plus ``out/base_head.safetensors``) from ``zoo``.

    Deterministic from the zoo's seed; single-threaded while training, as the zoo is.

    Returns:
        The model dir ``out``.
    """
    out = Path(out)
    X, y = _more_upright_digits(zoo.seed)
    backbone, _ = load_backbone(zoo.base)
    head = load_head(zoo.root / "base_head.safetensors")
    with _one_thread():
        torch.manual_seed(zoo.seed)
        v2, v2_head = train(
            backbone,
            head,
            X,
            y,
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=zoo.seed * 1000 + 777,
            shift=config.shift,
        )
    save_backbone(v2, _config(zoo), out, force=force)
    save_head(v2_head, out / "base_head.safetensors", task="pretrain-upright-digit-v2", force=True)
    return out


def probe_head(backbone_dir: str | os.PathLike, zoo: Zoo, task: str) -> nn.Linear:
    """The zoo's linear probe of a frozen backbone on ``task``'s training split."""
    cfg = build_config(zoo)
    backbone, _ = load_backbone(backbone_dir)
    Xtr, ytr = task_data(task, "train", seed=zoo.seed)
    with _one_thread():
        return probe(
            backbone, Xtr, ytr, TASKS[task].num_classes, steps=cfg.probe_steps, lr=cfg.probe_lr
        )


def finetune(
    backbone_dir: str | os.PathLike, zoo: Zoo, task: str
) -> tuple[nn.Module, nn.Linear, nn.Linear]:
    """The zoo's recipe on another backbone: a linear probe, then LP-FT from it.

    Uses the zoo's own build configuration and the same per-task data-order seed as the
    zoo's fine-tune of ``task``.

    Returns:
        ``(fine-tuned backbone, its head, the probe head of the frozen backbone)``.
    """
    cfg = build_config(zoo)
    k = list(cfg.tasks).index(task)
    backbone, _ = load_backbone(backbone_dir)
    Xtr, ytr = task_data(task, "train", seed=zoo.seed)
    with _one_thread():
        probe_head = probe(
            backbone, Xtr, ytr, TASKS[task].num_classes, steps=cfg.probe_steps, lr=cfg.probe_lr
        )
        ft, head = train(
            backbone,
            probe_head,
            Xtr,
            ytr,
            epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr,
            batch_size=cfg.batch_size,
            seed=zoo.seed * 1000 + k + 1,
        )
    return ft, head, probe_head


def build_config(zoo: Zoo) -> BuildConfig:
    """The `BuildConfig` the zoo was built with (from its manifest)."""
    doc = json.loads((zoo.root / "manifest.json").read_text(encoding="utf-8"))
    raw = doc.get("build_config") or {}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return BuildConfig(**fields) if fields else FULL


def _more_upright_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upright digits of the pretrain and train splits (the train split's upright images
    are never a task input: every task transforms them)."""
    X1, y1 = pretrain_data(seed=seed)
    from graft.zoo.tasks import _digits

    images, digits = _digits()
    idx = split_indices(seed)["train"]
    return torch.cat([X1, images[idx]]), torch.cat([y1, digits[idx]])


def _config(zoo: Zoo) -> dict:
    doc = json.loads((zoo.root / "manifest.json").read_text(encoding="utf-8"))
    return doc["model_config"]


class _one_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
