"""``graft pleas``'s work: two or more model folders and a data set in, a merged model
folder out.

Why not a ``graft merge`` recipe method: the engine streams tensors independently, but
PLeaS solves layer ``l`` on the merged model's own activations, which depend on every
layer before it (and on the permutation found from both whole models). So PLeaS is a
command of its own, like ``graft twin``: the models are loaded whole (the architectures
it supports are small encoders), run on the data, and the result written atomically.

Output: a folder ``transformers`` (BERT) or graft's digits loader reads — the merged
backbone under A's tensor names, A's config (``intermediate_size`` widened when
``ratio < 1``), A's tokenizer files, a model card with the settings, and, when both
models carry a head (``head.safetensors``), the merged head. More than two models merge
into the first one's basis (`graft.merge.pleas.pleas_many`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from graft.align import UnsupportedArchitecture, permutation_spec
from graft.data import DataError, DataOptions, Runner, load_runner, read_data, save_head_file
from graft.data.heads import HEAD_FILE
from graft.data.resolve import default_zoo
from graft.data.runner import EncoderClassifier, pool
from graft.io import (
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    open_checkpoint,
    write_model_card,
)
from graft.merge.pleas import DEFAULT_RIDGE, MATCHES, pleas_many


@dataclass
class PleasReport:
    out: Path
    architecture: str
    match: str
    ratio: float
    examples: int
    widths: dict[str, int]
    errors: dict[str, float]
    head: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _backbone(runner: Runner) -> tuple[nn.Module, str]:
    """The runner's backbone module and the prefix of its parameter names in ``names``."""
    if runner.kind == "digits":
        return runner.module.backbone, "backbone."
    if isinstance(runner.module, EncoderClassifier):
        return runner.module.encoder, "encoder."
    raise DataError(
        f"{runner.path} is a sequence-classification checkpoint; graft pleas merges "
        "backbones (a BertModel/MiniLM folder, optionally with head.safetensors) or digits nets"
    )


def run_pleas(
    models: Sequence[str | os.PathLike],
    data: str,
    out: str | os.PathLike,
    *,
    match: str = "activation",
    ratio: float = 1.0,
    weights: Sequence[float] | None = None,
    ridge: float = DEFAULT_RIDGE,
    solve: bool = True,
    options: DataOptions | None = None,
    zoo: str | os.PathLike | None = None,
    split: str = "train",
    batch_size: int = 64,
    max_length: int | None = None,
    force: bool = False,
    overwrite_anything: bool = False,
    progress_bar: Callable[[int], AbstractContextManager[Callable[[int], None]]] | None = None,
) -> PleasReport:
    """Merge ``models`` (two or more) into the first one's basis with PLeaS on ``data``
    and write ``out``. ``weights``: each model's share (default equal), normalised to
    sum 1.

    ``progress_bar(total)``: a context manager yielding a hook advanced once per step
    (the matching, each layer solved, the head).

    Raises:
        DataError / RecipeError: bad settings, models or data (one line, with the fix).
        GraftIOError: ``out`` may not be written, or a file cannot be read.
    """
    start = time.time()
    if match not in MATCHES:
        raise DataError(f"unknown --match {match!r}; valid: {', '.join(MATCHES)}")
    if not 0 < ratio <= 1:
        raise DataError(f"--ratio must be in (0, 1], got {ratio}; 1 merges every unit")
    models = list(models)
    if len(models) < 2:
        raise DataError(f"PLeaS merges two or more models, got {len(models)}; name them all")
    ws = _weights(weights, len(models))
    if ridge < 0:
        raise DataError(f"--ridge must be >= 0, got {ridge}")
    from graft.io import check_output

    check_output(out, inputs=models, force=force, overwrite_anything=overwrite_anything)
    runners = [load_runner(m, max_length=max_length) for m in models]
    backbones = [_backbone(r) for r in runners]
    ra, (ba, pa) = runners[0], backbones[0]
    with open_checkpoint(ra.path) as ckpt:
        config, root, modules_root = ckpt.config, ckpt.root, ckpt.modules_root
    try:
        spec = permutation_spec(config, ba.state_dict(), where=str(models[0]))
    except UnsupportedArchitecture as e:
        raise DataError(str(e)) from None
    shapes = {n: tuple(t.shape) for n, t in ba.state_dict().items()}
    for path, (bb, _) in zip(models[1:], backbones[1:], strict=True):
        if {n: tuple(t.shape) for n, t in bb.state_dict().items()} != shapes:
            raise DataError(
                f"{models[0]} and {path} differ in tensor names or shapes; PLeaS merges "
                "models of one architecture and size"
            )
    dataset = read_data(
        data, options or DataOptions(require_labels=False), zoo=default_zoo(data, zoo), split=split
    )
    ra.check(dataset)
    batches = [
        ra.inputs(dataset, i, min(i + batch_size, len(dataset)))
        for i in range(0, len(dataset), batch_size)
    ]
    warnings = []
    heads = None
    found = [getattr(r.module, "head", None) for r in runners]
    linear = [h for h in found if isinstance(h, nn.Linear)]
    if len(linear) == len(found) and len({tuple(h.weight.shape) for h in linear}) == 1:
        heads = linear
    elif linear:
        warnings.append(
            "not every model has a head of one size; no head is merged "
            f"({len(linear)} of {len(found)} have one)"
        )
    features = None
    if ra.kind == "transformers":

        def features(m, inputs):  # the heads read pooled last hidden states
            hidden = m(**inputs).last_hidden_state
            return pool(hidden, inputs.get("attention_mask"), ra.pooling)

    total = len(models) - 1 + (len(spec.stages) if solve else 0) + (heads is not None)
    with progress_bar(total) if progress_bar else nullcontext(None) as tick:
        result = pleas_many(
            [b for b, _ in backbones],
            spec,
            batches,
            match=match,
            ratio=ratio,
            weights=ws,
            ridge=ridge,
            solve=solve,
            heads=heads,
            features=features,
            progress=tick,
        )
    new_config = dict(config)
    if result.widths:
        new_config["intermediate_size"] = next(iter(result.widths.values()))
    settings = {
        "method": "pleas",
        "match": match,
        "ratio": ratio,
        "weights": ws,
        "ridge": ridge,
        "least_squares": solve,
        "data": str(data),
        "examples": len(dataset),
    }
    state = {
        ra.names[pa + n]: t.contiguous() for n, t in result.state.items() if pa + n in ra.names
    }
    _save(
        out,
        state,
        new_config,
        root,
        modules_root,
        ra,
        result.head,
        settings,
        [str(m) for m in models],
        force,
        overwrite_anything,
    )
    return PleasReport(
        Path(out),
        spec.architecture,
        match,
        ratio,
        len(dataset),
        result.widths,
        result.errors,
        result.head is not None,
        time.time() - start,
        warnings,
    )


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Each model's share, normalised to sum 1 (default: equal)."""
    if weights is None:
        return [1.0 / n] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise DataError(f"--weights gives {len(ws)} shares for {n} models; give one per model")
    if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise DataError(f"--weights must be finite, >= 0 and not all 0, got {ws}")
    total = sum(ws)
    return [w / total for w in ws]


def _save(
    out,
    state,
    config,
    root,
    modules_root,
    runner,
    head,
    settings,
    sources,
    force,
    overwrite_anything,
):
    from graft import __version__

    entries = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    meta = {"graft_version": __version__, "graft_method": "pleas"}
    with atomic_output_dir(
        Path(out), force=force, inputs=sources, overwrite_anything=overwrite_anything
    ) as tmp:
        with ShardedWriter(tmp, entries, metadata=meta) as writer:
            for name, t in state.items():
                writer.write(name, t)
            writer.finish()
        copy_sidecar_files(root, tmp, config=config, modules_root=modules_root)
        if head is not None:
            linear = nn.Linear(head[0].shape[1], head[0].shape[0])
            with torch.no_grad():
                linear.weight.copy_(head[0])
                linear.bias.copy_(head[1])
            save_head_file(
                linear,
                tmp / HEAD_FILE,
                label_names=runner.label_names,
                pooling=runner.pooling if runner.kind == "transformers" else None,
            )
        write_model_card(
            tmp,
            base_models=sources,
            relation="merge",
            tags=("graft", "merge", "pleas"),
            recipe_yaml=yaml.safe_dump(settings, sort_keys=False),
            title=f"graft PLeaS merge of {', '.join(Path(s).name for s in sources)}",
        )
