"""The offline real-data zoo: a base, one fine-tune per task and a soup family, trained on
scikit-learn's digits in seconds on a CPU, with the accuracy figures that make it a
benchmark for merge methods.

Layout of a zoo directory (built in a hidden temp dir and moved into place whole)::

    base/                         config.json + model.safetensors (backbone only)
    base_head.safetensors         the base's pretraining head (upright digits; no task)
    finetuned/<task>/             fine-tuned backbone per task
    heads/<task>.safetensors      the head trained with that fine-tune
    probe_heads/<task>.safetensors  linear probe of the frozen base, per task
    soup/<i>/                     soup ingredients: fine-tunes of ``soup_task``
    soup_heads/<i>.safetensors    the head each ingredient trained
    manifest.json                 config hash, sha256 of every model.safetensors, report

Training, in order (all from ``seed``; single-threaded so the bytes are reproducible):

1. Base: the backbone + a 10-way head trained briefly on the *upright* pretraining split.
2. Probe per task: a linear head on frozen base features of the task's train split
   (full-batch Adam from zero, no weight decay).
3. Fine-tune per task: backbone *and* head trained from the base, the head initialised
   from the task's probe (LP-FT, Kumar et al. 2022). Starting every head from the same
   probe also puts a soup's heads in one basin, so they can be averaged.
4. Soup family: ``soup_size`` fine-tunes of ``soup_task`` with different learning rates,
   seeds and random 1-pixel shifts. A soup is evaluated with the uniform average of its
   ingredients' heads (`soup_head`), as the whole fine-tuned model is averaged in
   Wortsman et al. 2022.

Bars (checked unless ``quick``; `ZooQualityError` otherwise): averaged over tasks,
fine-tuned accuracy beats the base's linear probe by >= 10 points, and the uniform
average of the fine-tuned backbones (each task with its own fine-tuned head) loses
>= 5 points against the fine-tunes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from graft.io import GraftIOError, atomic_output_dir, read_json
from graft.models.digits_net import (
    build_backbone,
    default_config,
    load_head,
    save_backbone,
    save_head,
)
from graft.zoo._report import check_bars, fingerprint, sha256, summary
from graft.zoo._train import average, probe, train
from graft.zoo.tasks import TASKS, pretrain_data, task_data

ZOO_FORMAT = "graft-digits-zoo"
ZOO_VERSION = 1  # bump when training code changes what a config builds
MIN_GAIN_OVER_PROBE = 10.0  # accuracy points
MIN_AVERAGE_LOSS = 5.0  # accuracy points
_REBUILD = "rebuild the zoo with `graft demo`"


class ZooError(ValueError):
    """A zoo directory is missing, incomplete or not a zoo."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides a zoo's bytes besides the seed (hashed into the manifest)."""

    hidden_size: int = 16
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 30
    finetune_lr: float = 1e-3
    batch_size: int = 64
    probe_steps: int = 300
    probe_lr: float = 1e-2
    tasks: tuple[str, ...] = tuple(TASKS)
    soup_task: str = "rot90-digit"
    soup_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    soup_shift: float = 0.3  # shift probability of the odd-numbered ingredients
    soup_size: int = 6
    soup_epochs: int = 30
    check_bars: bool = True


FULL = BuildConfig()
QUICK = BuildConfig(
    pretrain_epochs=4,
    finetune_epochs=3,
    probe_steps=100,
    soup_size=3,
    soup_epochs=2,
    check_bars=False,
)


@dataclass
class Zoo:
    """Paths of a built zoo and its figures (``report``, as in manifest.json)."""

    root: Path
    base: Path
    finetuned: dict[str, Path]
    heads: dict[str, Path]
    probe_heads: dict[str, Path]
    soup: list[Path]
    soup_task: str
    seed: int
    report: dict
    soup_heads: list[Path] = field(default_factory=list)


def config_hash(config: BuildConfig, seed: int) -> str:
    text = json.dumps(
        {"format": ZOO_FORMAT, "version": ZOO_VERSION, "seed": seed, "config": asdict(config)},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_zoo(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> Zoo:
    """Build the zoo in ``root``, or reuse the complete one already there for this config.

    Args:
        root: the zoo directory; an existing zoo with another config is replaced.
        seed: fixes the splits, initialisations and data order (same seed, same bytes).
        quick: the small CI configuration (seconds); bars are reported, not enforced.
        log: progress and figures, one line at a time.

    Raises:
        ZooError: ``root`` exists and is neither empty nor a zoo.
        ZooQualityError: the full configuration missed a bar; nothing is written.
    """
    root = Path(root)
    config = QUICK if quick else FULL
    digest = config_hash(config, seed)
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("config_hash") == digest:
        try:
            zoo = load_zoo(root)
            log(f"reusing the zoo in {root} (config {digest})")
            return zoo
        except ZooError:
            pass  # incomplete: rebuild
    if manifest is None and root.exists() and any(root.iterdir()):
        raise ZooError(
            f"{root} exists and is not a graft zoo (no manifest.json); choose another path"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible reductions, and fair to a shared machine
    try:
        # The manifest check above decides: an old zoo (even without a .graft marker) goes.
        with atomic_output_dir(root, force=True, overwrite_anything=True) as tmp:
            start = time.perf_counter()
            doc = _build(tmp, config, seed, log)
            doc["report"]["seconds"] = round(time.perf_counter() - start, 2)
            doc["config_hash"] = digest
            check_bars(
                doc["report"],
                what="zoo",
                min_gain=MIN_GAIN_OVER_PROBE,
                min_loss=MIN_AVERAGE_LOSS,
                enforce_gain=config.check_bars,
                enforce_loss=config.check_bars,
                log=log,
            )
            (tmp / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    finally:
        torch.set_num_threads(threads)
    return load_zoo(root)


def load_zoo(root: str | os.PathLike) -> Zoo:
    """The zoo built in ``root``.

    Raises:
        ZooError: no manifest.json, or a file it names is missing.
    """
    root = Path(root)
    doc = _read_manifest(root)
    if doc is None:
        raise ZooError(
            f"no graft zoo at {root} (manifest.json missing); run `graft demo` to build it"
        )
    where = root / "manifest.json"

    def field(key: str, kind: type):
        value = doc.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ZooError(f"{where}: {key!r} is missing or not a {kind.__name__}; {_REBUILD}")
        return value

    def rel(entry: object, name: str) -> Path:
        value = entry.get("path") if isinstance(entry, dict) else entry
        if (
            not isinstance(value, str)
            or not value
            or Path(value).is_absolute()
            or (".." in Path(value).parts)
        ):
            raise ZooError(f"{where}: {name} is not a path inside the zoo; {_REBUILD}")
        return root / value

    def table(key: str) -> dict[str, Path]:
        return {t: rel(e, f"{key}[{t[:40]!r}]") for t, e in field(key, dict).items()}

    zoo = Zoo(
        root=root,
        base=rel(field("base", dict), "base"),
        finetuned=table("finetuned"),
        heads=table("heads"),
        probe_heads=table("probe_heads"),
        soup=[rel(e, f"soup[{i}]") for i, e in enumerate(field("soup", list))],
        soup_task=field("soup_task", str),
        seed=field("seed", int),
        report=field("report", dict),
        soup_heads=[rel(e, f"soup_heads[{i}]") for i, e in enumerate(field("soup_heads", list))],
    )
    paths = [zoo.base, *zoo.finetuned.values(), *zoo.soup]
    missing = [p for p in paths if not (p / "model.safetensors").is_file()]
    missing += [
        p
        for p in [*zoo.heads.values(), *zoo.probe_heads.values(), *zoo.soup_heads]
        if not p.is_file()
    ]
    if missing:
        raise ZooError(
            f"zoo {root} is incomplete ({missing[0]} missing); rebuild it with `graft demo`"
        )
    return zoo


def zoo_tasks(root: str | os.PathLike) -> list[str]:
    """The tasks a zoo (digits or text) keeps a head for, in its manifest's order.

    Raises:
        ZooError: no zoo manifest at ``root``, or it is malformed.
    """
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ZooError(f"no graft zoo at {root} (manifest.json missing); build it or pass --zoo")
    try:
        doc = read_json(path, fix="rebuild the zoo")
    except GraftIOError as e:
        raise ZooError(str(e)) from None
    heads = doc.get("heads") if isinstance(doc, dict) else None
    if not isinstance(heads, dict):
        raise ZooError(f"{path} has no 'heads' table; rebuild the zoo")
    return list(heads)


def soup_head(zoo: Zoo, members: list[int] | None = None) -> nn.Linear:
    """The uniform average of the soup ingredients' heads (all of them by default).

    This is the head a soup of those ingredients' backbones is evaluated with.
    """
    heads = [
        load_head(zoo.soup_heads[i])
        for i in (members if members is not None else range(len(zoo.soup_heads)))
    ]
    if not heads:
        raise ValueError("soup_head needs at least one ingredient")
    out = copy.deepcopy(heads[0])
    with torch.no_grad():
        out.weight.copy_(torch.stack([h.weight for h in heads]).mean(0))
        out.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))
    return out


def _build(tmp: Path, cfg: BuildConfig, seed: int, log: Callable[[str], None]) -> dict:
    model_config = default_config(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
    )
    doc = {
        "format": ZOO_FORMAT,
        "version": ZOO_VERSION,
        "seed": seed,
        "build_config": asdict(cfg),
        "model_config": model_config,
        "tasks": {t: TASKS[t].description for t in cfg.tasks},
    }
    torch.manual_seed(seed)
    X, y = pretrain_data(seed=seed)
    base, base_head = train(
        build_backbone(model_config),
        nn.Linear(cfg.hidden_size, 10),
        X,
        y,
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        batch_size=cfg.batch_size,
        seed=seed,
    )
    doc["base"] = _save_model(base, model_config, tmp, "base")
    _save_head(base_head, tmp, "base_head.safetensors", "pretrain-upright-digit", "base")
    log(f"pretrained the base on {len(y)} upright digits")
    doc["finetuned"], doc["heads"], doc["probe_heads"], doc["report"] = _build_finetunes(
        tmp, cfg, seed, base, model_config, log
    )
    doc["soup_task"] = cfg.soup_task
    doc["soup"], doc["soup_heads"], doc["report"]["soup"] = _build_soup(
        tmp, cfg, seed, base, model_config, log
    )
    return doc


def _build_finetunes(tmp, cfg, seed, base, model_config, log) -> tuple[dict, dict, dict, dict]:
    """Probe + fine-tune per task, then the uniform average of the fine-tunes; the report."""
    from graft.eval.evaluate import evaluate  # graft.eval imports the zoo's tasks

    entries, heads_at, probes_at, models, heads, rows = {}, {}, {}, {}, {}, {}
    for k, task in enumerate(cfg.tasks):
        Xtr, ytr = task_data(task, "train", seed=seed)
        Xte, yte = task_data(task, "test", seed=seed)
        probe_head = probe(
            base, Xtr, ytr, TASKS[task].num_classes, steps=cfg.probe_steps, lr=cfg.probe_lr
        )
        probes_at[task] = _save_head(
            probe_head, tmp, f"probe_heads/{task}.safetensors", task, "base"
        )
        ft, head = train(
            base,
            probe_head,
            Xtr,
            ytr,
            epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr,
            batch_size=cfg.batch_size,
            seed=seed * 1000 + k + 1,
        )
        entries[task] = _save_model(ft, model_config, tmp, f"finetuned/{task}")
        heads_at[task] = _save_head(
            head, tmp, f"heads/{task}.safetensors", task, entries[task]["path"]
        )
        models[task], heads[task] = ft, head
        rows[task] = {
            "probe": evaluate(base, probe_head, Xte, yte),
            "finetuned": evaluate(ft, head, Xte, yte),
        }
        log(
            f"fine-tuned {task}: probe {rows[task]['probe']['accuracy']:.1%} -> "
            f"fine-tuned {rows[task]['finetuned']['accuracy']:.1%}"
        )
    merged = average(list(models.values()))
    for task in cfg.tasks:
        X, y = task_data(task, "test", seed=seed)
        rows[task]["average_merge"] = evaluate(merged, heads[task], X, y)
    return entries, heads_at, probes_at, summary(rows)


def _build_soup(tmp, cfg, seed, base, model_config, log) -> tuple[list, list, dict]:
    """``soup_size`` fine-tunes of the soup task (varied lr, seed, shifts) and their soup."""
    from graft.eval.evaluate import evaluate

    task = cfg.soup_task
    Xtr, ytr = task_data(task, "train", seed=seed)
    held_out = {s: task_data(task, s, seed=seed) for s in ("val", "test")}
    probe_head = probe(
        base, Xtr, ytr, TASKS[task].num_classes, steps=cfg.probe_steps, lr=cfg.probe_lr
    )
    entries, heads_at, rows, models, heads = [], [], [], [], []
    for i in range(cfg.soup_size):
        lr, s = cfg.soup_lrs[i % len(cfg.soup_lrs)], seed * 1000 + 500 + i
        shift = cfg.soup_shift if i % 2 else 0.0
        ft, head = train(
            base,
            probe_head,
            Xtr,
            ytr,
            epochs=cfg.soup_epochs,
            lr=lr,
            batch_size=cfg.batch_size,
            seed=s,
            shift=shift,
        )
        entry = _save_model(ft, model_config, tmp, f"soup/{i}")
        entries.append({**entry, "lr": lr, "seed": s, "shift_probability": shift})
        heads_at.append(_save_head(head, tmp, f"soup_heads/{i}.safetensors", task, entry["path"]))
        rows.append({k: evaluate(ft, head, *xy)["accuracy"] for k, xy in held_out.items()})
        models.append(ft)
        heads.append(head)
    soup, soup_h = average(models), average(heads)
    uniform = {k: evaluate(soup, soup_h, *xy)["accuracy"] for k, xy in held_out.items()}
    best = max(rows, key=lambda r: r["val"])
    log(
        f"soup of {len(rows)} {task} fine-tunes: ingredients test "
        + ", ".join(f"{r['test']:.1%}" for r in rows)
        + f"; uniform soup {uniform['test']:.1%} (best-on-val ingredient {best['test']:.1%})"
    )
    return entries, heads_at, {"task": task, "ingredients": rows, "uniform_soup": uniform}


# --- files --------------------------------------------------------------------------


def _save_model(module: nn.Module, config: dict, tmp: Path, rel: str) -> dict:
    save_backbone(module, config, tmp / rel)
    return {"path": rel, "sha256": sha256(tmp / rel / "model.safetensors")}


def _save_head(head: nn.Linear, tmp: Path, rel: str, task: str, backbone: str) -> str:
    """Save a head under ``tmp/rel``, fingerprinted with the backbone saved at ``tmp/backbone``."""
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    save_head(head, tmp / rel, task=task, model_fingerprint=fingerprint(tmp / backbone))
    return rel


def _read_manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        doc = read_json(path, fix=_REBUILD)
    except GraftIOError as e:  # not JSON, not UTF-8, too large or too deep
        raise ZooError(str(e)) from None
    if not isinstance(doc, dict) or doc.get("format") != ZOO_FORMAT:
        raise ZooError(f"{path} is not a graft digits zoo manifest; choose another path")
    return doc
