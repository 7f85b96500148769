"""EMR-merging on disk: `graft merge` with ``merge_method: emr`` writes the unified model
and one modulator per task, and `graft apply` / `graft eval` rebuild each task's model.

The math is :mod:`graft.merge.emr`. The folder `run_emr` writes::

    OUT/                         an HF model folder: the unified model θ₀ + τ_uni
                                 (config, tokenizer and model card as `graft merge` writes)
    OUT/emr/manifest.json        what the folder holds (below)
    OUT/emr/unified.safetensors  τ_uni of every merged tensor, float32: a dense graft
                                 delta against the base
    OUT/emr/<task>.safetensors   task ``<task>``'s modulator: a graft patch whose tensors
                                 use the ``emr`` codec, ``{name}::mask`` (Mₜ, one bit per
                                 entry) and ``{name}::scale`` (λₜ, float32), and whose
                                 ``graft_shared`` names ``unified.safetensors``

so ``graft apply BASE OUT/emr/<task>.safetensors -o DIR`` writes ``θ₀ + λₜ·Mₜ ⊙ τ_uni``
(float32 math, cast to each tensor's dtype), and ``graft eval OUT --task <task>`` evaluates
that model without writing it (with the zoo's head for ``<task>``; ``--modulator NAME``
picks the model for other data, ``--modulator unified`` the shared one). The manifest (JSON)::

    {"format": "graft-emr", "version": 1, "method": "emr",
     "base": "/abs/path/of/base", "base_fingerprint": "...",
     "unified": "unified.safetensors",
     "tasks": [{"name": "mnist", "model": "zoo/finetuned/mnist",
                "patch": "mnist.safetensors", "scale": 1.83}, ...]}

Task names are the last component of each model's path (characters outside
``[A-Za-z0-9._-]`` become ``_``; repeats get ``-2``, ``-3``...), in recipe order. The
``emr`` codec stores λ once per tensor, all equal to the task's λ (EMR's one scalar per task).
Tensors the merge copies (non-float buffers) are in the unified model but in no patch, so
`graft apply` keeps the base's. A modulator costs one bit per merged entry plus 4 bytes
per tensor; the unified delta is float32, so the folder holds the model twice plus T bits
per parameter.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graft import __version__
from graft.delta._bits import pack_bits, packed_size
from graft.delta.patch import FORMAT_VERSION, DeltaError, open_delta
from graft.io import (
    ShardedWriter,
    atomic_output_dir,
    copy_sidecar_files,
    copy_tokenizer,
    open_checkpoint,
    read_json,
    recipe_hash,
    write_model_card,
    write_text,
)
from graft.merge import emr as emr_math
from graft.plan import (
    MergePlan,
    NonFiniteInputError,
    PlanError,
    RunStats,
    TensorJob,
    default_threads,
    resolve_device,
    run_pass,
)
from graft.plan.engine import all_finite

FOLDER = "emr"
MANIFEST = "manifest.json"
UNIFIED = "unified.safetensors"
FORMAT = "graft-emr"
VERSION = 1
_ONE_FILE = 1 << 62  # shard limit that keeps each emr/ file whole


@dataclass(frozen=True)
class EmrTask:
    """One task of an EMR folder: its name, the model it came from, its patch and λ."""

    name: str
    model: str
    patch: Path
    scale: float


@dataclass(frozen=True)
class EmrManifest:
    """An EMR folder's ``emr/manifest.json``, paths resolved."""

    folder: Path
    base: Path
    base_fingerprint: str
    unified: Path
    tasks: tuple[EmrTask, ...]

    def task(self, name: str) -> EmrTask:
        """The task called ``name``.

        Raises:
            DeltaError: no such task; the message lists the folder's tasks.
        """
        for t in self.tasks:
            if t.name == name:
                return t
        valid = ", ".join(t.name for t in self.tasks)
        raise DeltaError(f"EMR folder {self.folder} has no task {name!r}; its tasks: {valid}")


def task_names(paths: list[str]) -> list[str]:
    """File-safe, distinct task names from model paths (module docstring)."""
    names: list[str] = []
    for raw in paths:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(raw.rstrip("/")).name).strip(".") or "task"
        if stem in (Path(UNIFIED).stem, Path(MANIFEST).stem):
            stem += "-task"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def is_emr_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder `run_emr` wrote (it has ``emr/manifest.json``)."""
    return (Path(path) / FOLDER / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> EmrManifest:
    """Read and check an EMR folder's manifest.

    Raises:
        DeltaError: not an EMR folder, or a manifest graft cannot use.
        GraftIOError: the file is unreadable.
    """
    root = Path(folder)
    path = root / FOLDER / MANIFEST
    if not path.is_file():
        raise DeltaError(f"{root} is not an EMR folder (no {FOLDER}/{MANIFEST}); merge with emr")
    doc = read_json(path, fix="re-run the EMR merge")
    bad = DeltaError(f"{path} is not a graft EMR manifest this graft reads; re-run the merge")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise bad
    try:
        tasks = tuple(
            EmrTask(str(t["name"]), str(t["model"]), _inside(root, t["patch"]), float(t["scale"]))
            for t in doc["tasks"]
        )
        return EmrManifest(
            root, Path(doc["base"]), str(doc["base_fingerprint"]), _inside(root, doc["unified"]),
            tasks,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise bad from None


def _inside(root: Path, name: object) -> Path:
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(name)
    return root / FOLDER / name


def task_state(
    folder: str | os.PathLike, task: str, *, base: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Task ``task``'s model ``θ₀ + λ·M ⊙ τ_uni`` in memory, with `graft apply`'s math.

    Args:
        folder: an EMR folder (`run_emr`).
        task: one of its tasks.
        base: the base model (default: the path the manifest records).

    Returns:
        Tensor name -> tensor, every tensor of the base, each in its dtype.

    Raises:
        DeltaError: no such task, a missing base, or a base with another content hash.
    """
    manifest = read_manifest(folder)
    entry = manifest.task(task)
    base_path = Path(base) if base is not None else manifest.base
    if not base_path.exists():
        raise DeltaError(
            f"EMR folder {folder} was merged onto {manifest.base}, which is not there; pass "
            f"the base, or run `graft apply BASE {entry.patch} -o DIR` and evaluate DIR"
        )
    patch = open_delta(entry.patch)
    try:
        with open_checkpoint(base_path) as b:
            if b.fingerprint() != patch.base_fingerprint:
                raise DeltaError(
                    f"{base_path} is not the base EMR folder {folder} was merged onto "
                    f"({manifest.base}); give that base"
                )
            out = {}
            for name in b.names:
                t = b.get(name)
                if name in patch.layout:
                    t = t.to(torch.float32).add_(patch.delta(name)).to(t.dtype)
                out[name] = t
            return out
    finally:
        patch.close()


# --- the merge pass ------------------------------------------------------------------------


def run_emr(
    plan: MergePlan,
    out: str | os.PathLike,
    *,
    threads: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int | str = 5_000_000_000,
    force: bool = False,
    overwrite_anything: bool = False,
    strict: bool = False,
    progress=None,
) -> RunStats:
    """Run an ``emr`` plan into the folder ``out`` (module docstring), atomically, in one
    pass over the inputs; arguments as for `graft.plan.run_plan`.

    Raises:
        PlanError: the plan is not an EMR merge of the ``models:`` form.
    """
    refs, names = _tasks(plan)
    threads = threads or default_threads()
    dev = resolve_device(device)
    computed = [j for j in plan.jobs if not j.copy]
    base = plan.checkpoints[plan.recipe.base_model]
    base_fp = base.fingerprint()
    start = time.perf_counter()
    with atomic_output_dir(
        Path(out), force=force, inputs=plan.input_paths(), overwrite_anything=overwrite_anything
    ) as tmp:
        (tmp / FOLDER).mkdir()
        writers = _Writers(plan, tmp, refs, names, computed, base_fp, max_shard_bytes)
        try:
            work = _Work(plan, writers, dev, strict)
            stats = run_pass(
                plan.jobs, work, threads=threads, input_bytes=plan.input_bytes, progress=progress
            )
            before = [work.terms[j.name][0] for j in computed]  # in output order
            after = [work.terms[j.name][1] for j in computed]
            scales = emr_math.rescalers(before, after) if computed else [1.0] * len(names)
            scales = [float(torch.tensor(s, dtype=torch.float32)) for s in scales]  # as stored
            writers.finish(computed, scales)
        except BaseException:
            writers.close()
            raise
        stats.shards = len(writers.model.files)
        stats.warnings = work.warnings
        _write_manifest(tmp, plan, refs, names, scales, base_fp)
        _write_sidecars(plan, tmp, stats.warnings.append)
    stats.seconds = time.perf_counter() - start
    return stats


def _tasks(plan: MergePlan) -> tuple[list, list[str]]:
    """The task models in recipe order and their names; every merged tensor must have one
    input per task, in that order."""
    if plan.method.name != "emr" or plan.recipe.models is None:
        raise PlanError("the EMR pass runs emr recipes of the models: form (not slices:)")
    refs = [m.model for m in plan.recipe.models if m.model != plan.recipe.base_model]
    for job in plan.jobs:
        if not job.copy and [s.model for s in job.inputs] != refs:
            raise PlanError(
                f"tensor {job.name} is not in every model the emr recipe names; EMR writes "
                "one modulator per model over the same tensors: drop the tensor or the model"
            )
    return refs, task_names([m.adapter or m.path for m in refs])


class _Writers:
    """The unified model (sharded), the unified delta and one patch per task."""

    def __init__(self, plan, tmp: Path, refs, names, computed, base_fp, max_shard_bytes):
        base_path = str(plan.checkpoints[plan.recipe.base_model].path)
        meta = {
            "graft_version": __version__,
            "graft_recipe_sha256": recipe_hash(plan.recipe.text),
            "graft_method": "emr",
        }
        entries = [(j.name, j.out_dtype, j.shape) for j in plan.jobs]
        common = {
            "graft_delta": FORMAT_VERSION,
            "graft_version": __version__,
            "graft_base": base_path,
            "graft_base_fingerprint": base_fp,
            "graft_dtype": "float32",
        }
        self.model = ShardedWriter(tmp, entries, max_shard_bytes=max_shard_bytes, metadata=meta)
        self.unified: ShardedWriter | None = None
        self.tasks: list[ShardedWriter] = []
        try:
            dense = {j.name: {"codec": "dense", "shape": list(j.shape)} for j in computed}
            self.unified = ShardedWriter(
                tmp / FOLDER,
                [(j.name, torch.float32, j.shape) for j in computed],
                max_shard_bytes=_ONE_FILE,
                metadata={
                    **common,
                    "graft_delta_method": "emr_unified",
                    "graft_finetuned": json.dumps([str(r) for r in refs]),
                    "graft_params": "{}",
                    "graft_layout": json.dumps(dense, sort_keys=True),
                },
                filename=UNIFIED,
            )
            layout = {j.name: {"codec": "emr", "shape": list(j.shape)} for j in computed}
            parts = []
            for j in computed:
                n = packed_size(math.prod(j.shape))
                parts += [
                    (f"{j.name}::mask", torch.uint8, (n,)),
                    (f"{j.name}::scale", torch.float32, ()),
                ]
            for ref, name in zip(refs, names, strict=True):
                ckpt = plan.checkpoints[ref]
                task_meta = {
                    **common,
                    "graft_delta_method": "emr",
                    "graft_finetuned": str(ckpt.path),
                    "graft_finetuned_fingerprint": ckpt.fingerprint(),
                    "graft_params": json.dumps({"task": name}),
                    "graft_layout": json.dumps(layout, sort_keys=True),
                    "graft_shared": UNIFIED,
                }
                self.tasks.append(
                    ShardedWriter(
                        tmp / FOLDER, parts, max_shard_bytes=_ONE_FILE, metadata=task_meta,
                        filename=f"{name}.safetensors",
                    )
                )  # fmt: skip
        except BaseException:
            self.close()
            raise

    def finish(self, computed: list[TensorJob], scales: list[float]) -> None:
        for writer, scale in zip(self.tasks, scales, strict=True):
            value = torch.tensor(scale, dtype=torch.float32)
            for j in computed:
                writer.write(f"{j.name}::scale", value)
        for w in [self.model, self.unified, *self.tasks]:
            w.finish()

    def close(self) -> None:
        for w in [self.model, self.unified, *self.tasks]:
            if w is not None:
                w.close()


class _Work:
    """Computes one job: writes the unified tensor, τ_uni and each task's mask, and keeps
    the job's rescale terms. Thread-safe."""

    def __init__(self, plan: MergePlan, writers: _Writers, device: torch.device, strict: bool):
        self.plan, self.writers, self.device, self.strict = plan, writers, device, strict
        self.terms: dict[str, tuple[list[float], list[float]]] = {}
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, job: TensorJob) -> int:
        if job.copy:
            src = job.base or job.inputs[0]
            t = self.plan.checkpoints[src.model].get(src.name).to(job.out_dtype).contiguous()
            self.writers.model.write(job.name, t)
            return t.numel() * t.element_size()
        base = self._load(job.base)
        deltas = [self._load(s).sub_(base) for s in job.inputs]
        unified = emr_math.elect(deltas)
        task_masks = emr_math.masks(deltas, unified)
        terms = emr_math.rescale_terms(deltas, unified, task_masks)
        del deltas
        with self._lock:
            self.terms[job.name] = terms
        u = unified.to("cpu").contiguous()
        self.writers.unified.write(job.name, u)
        written = u.numel() * 4
        for writer, mask in zip(self.writers.tasks, task_masks, strict=True):
            packed = pack_bits(mask)
            writer.write(f"{job.name}::mask", packed)
            written += packed.numel()
        model = base.add_(unified).to(device="cpu", dtype=job.out_dtype).contiguous()
        self.writers.model.write(job.name, model)
        return written + model.numel() * model.element_size()

    def _load(self, src) -> torch.Tensor:
        t = self.plan.checkpoints[src.model].get(src.name).to(self.device, torch.float32)
        if not all_finite(t):
            msg = f"tensor {src.name} of model {src.model} contains NaN or Inf"
            if self.strict:
                raise NonFiniteInputError(msg + "; fix the checkpoint or drop --strict")
            with self._lock:
                self.warnings.append(msg)
        return t


def _write_manifest(tmp: Path, plan, refs, names, scales, base_fp) -> None:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "method": "emr",
        "base": str(Path(plan.checkpoints[plan.recipe.base_model].path).resolve()),
        "base_fingerprint": base_fp,
        "unified": UNIFIED,
        "tasks": [
            {"name": n, "model": str(r), "patch": f"{n}.safetensors", "scale": s}
            for r, n, s in zip(refs, names, scales, strict=True)
        ],
    }
    write_text(tmp / FOLDER / MANIFEST, json.dumps(doc, indent=2) + "\n")


def _write_sidecars(plan: MergePlan, dst: Path, warn) -> None:
    """Config, tokenizer and model card, as `graft merge` writes them for any method."""
    side = plan.checkpoints[plan.sidecar_model]
    copy_sidecar_files(
        side.root, dst, config=plan.config, warn=warn, modules_root=side.modules_root
    )
    if plan.tokenizer_model is not None:
        copy_tokenizer(plan.checkpoints[plan.tokenizer_model].root, dst, warn=warn)
    write_model_card(
        dst,
        base_models=[str(m) for m in plan.recipe.referenced_models()],
        relation="merge",
        tags=("graft", "merge", "emr"),
        recipe_yaml=plan.recipe.text,
    )
