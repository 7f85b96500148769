"""LoRA in and out: extract a PEFT adapter from a fine-tune, merge adapters, and read a
model with an adapter applied per tensor (recipes' ``model+adapter`` inputs).

Extraction (the SVD route of LoRA-extraction tools and PortLLM's portable patches): for
each linear weight, δ = W_ft − W_base (out x in) ≈ U_r S_r V_rᵀ; PEFT stores
``lora_B = U_r S_r^{1/2}`` (out x r) and ``lora_A = S_r^{1/2} V_rᵀ`` (r x in) with scaling
``lora_alpha / r``; graft writes ``lora_alpha = r`` so the scaling is 1.

Conventions that change results:

* Targets are the 2-D ``*.weight`` tensors outside the embeddings and the output head
  (`graft.plan.arch`); their deltas are what the adapter carries. The deltas of every
  other tensor (norms, biases, embeddings) are dropped, and the report counts them.
* GPT-2-style models store linear weights transposed (``Conv1D``, in x out): for model
  types in `FAN_IN_FAN_OUT` the SVD is of δᵀ and the adapter sets ``fan_in_fan_out``.
* Merging adapters: ``concat`` stacks the scaled factors (B = [w₁s₁B₁ … wₙsₙBₙ],
  A = [A₁; …; Aₙ]), which is exactly Σ wᵢ sᵢ Bᵢ Aᵢ at rank Σ rᵢ; with a target rank the
  sum is re-factorized by QR of both stacks and an SVD of the small core (exact truncated
  SVD of the summed update, never forming the out x in matrix).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from graft.delta._common import FiniteCheck, PairDelta, Report, parse_dtype
from graft.delta.lowrank import factorize, truncated_svd
from graft.delta.patch import ADAPTER_PREFIX, Delta, DeltaError, open_delta
from graft.io import (
    Checkpoint,
    ShardedWriter,
    atomic_output_dir,
    is_adapter_dir,
    open_model,
    write_text,
)
from graft.plan import default_threads, resolve_device, run_pass, tensor_seed
from graft.plan.arch import is_pre_block, is_vocab_tensor

# model_type values whose linear layers are Conv1D (weight stored in x out).
FAN_IN_FAN_OUT = ("gpt2",)
ADAPTER_FILE = "adapter_model.safetensors"


def lora_targets(ckpt: Checkpoint) -> list[str]:
    """The tensors extraction targets: 2-D float ``*.weight`` outside embeddings and head."""
    return [
        n
        for n in ckpt.names
        if n.endswith(".weight")
        and len(ckpt.info(n).shape) == 2
        and ckpt.info(n).dtype.is_floating_point
        and not is_vocab_tensor(n)
        and not is_pre_block(n)
    ]


def adapter_config(
    base: str, modules: Sequence[str], rank: int, *, fan_in_fan_out: bool, ranks=None
) -> dict:
    """A PEFT ``adapter_config.json`` with scaling 1 for every module (alpha = r)."""
    pattern = {re.escape(m): r for m, r in (ranks or {}).items() if r != rank}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
    }


def extract_lora(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int,
    dtype: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
    force: bool = False,
    overwrite_anything: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Write the rank-``rank`` LoRA adapter of ``finetuned - base`` as a PEFT folder.

    Raises:
        DeltaError: the models do not match, there is nothing to target, ``rank`` exceeds
            every target's smaller side, or a target's delta holds NaN or Inf (no SVD).

    A target whose smaller side is below ``rank`` is stored exactly: its delta's own
    factors, zero-padded to ``rank`` (PEFT needs one ``r`` for every module).
    """
    dev = resolve_device(device)
    check = FiniteCheck(
        True, "a LoRA adapter (SVD) cannot be extracted from it; fix the checkpoint"
    )
    with open_model(finetuned) as ft, open_model(base) as b:
        pair = PairDelta(ft, b)
        targets = lora_targets(ft)
        if not targets:
            raise DeltaError(f"{finetuned} has no linear weights to extract a LoRA adapter from")
        if rank < 1:
            raise DeltaError(f"--rank must be at least 1, got {rank}")
        useful = max(min(ft.info(name).shape) for name in targets)
        if rank > useful:
            raise DeltaError(
                f"--rank {rank} is larger than every target tensor allows (the largest smaller "
                f"side is {useful}, which stores each delta exactly); choose at most {useful}"
            )
        transpose = (ft.config or {}).get("model_type") in FAN_IN_FAN_OUT
        value_dtype = parse_dtype(dtype)
        entries = []
        for name in targets:
            rows, cols = ft.info(name).shape[::-1] if transpose else ft.info(name).shape
            dt = value_dtype or ft.info(name).dtype
            key = ADAPTER_PREFIX + name[: -len(".weight")]
            entries += [
                (f"{key}.lora_A.weight", dt, (rank, cols)),
                (f"{key}.lora_B.weight", dt, (rows, rank)),
            ]
        dtypes = {e[0]: e[1] for e in entries}

        def work(name: str, writer: ShardedWriter) -> int:
            delta = pair.delta(name, dev, check)
            gen = torch.Generator().manual_seed(tensor_seed(0, name))
            matrix = delta.T if transpose else delta
            # A target smaller than the rank (a 2-class classifier) is exact at its own
            # rank; its factors are zero-padded so every module has the adapter's r.
            k = min(rank, *matrix.shape)
            try:
                b_, a_ = factorize(matrix, rank=k, generator=gen)
                if k < rank:
                    b_ = torch.cat([b_, b_.new_zeros(b_.shape[0], rank - k)], dim=1)
                    a_ = torch.cat([a_, a_.new_zeros(rank - k, a_.shape[1])], dim=0)
            except torch.linalg.LinAlgError:
                raise DeltaError(
                    f"cannot extract a LoRA of tensor {name}: the SVD of its delta did not "
                    "converge (ill-conditioned); exclude it or check the checkpoints"
                ) from None
            key = ADAPTER_PREFIX + name[: -len(".weight")]
            for part, t in (("A", a_), ("B", b_)):
                stored = f"{key}.lora_{part}.weight"
                writer.write(stored, t.to(device="cpu", dtype=dtypes[stored]).contiguous())
            return (a_.numel() + b_.numel()) * dtypes[f"{key}.lora_A.weight"].itemsize

        modules = [n[: -len(".weight")] for n in targets]
        config = adapter_config(str(base), modules, rank, fan_in_fan_out=transpose)
        with atomic_output_dir(
            Path(out),
            force=force,
            inputs=[finetuned, base],
            overwrite_anything=overwrite_anything,
        ) as tmp:
            with ShardedWriter(
                tmp,
                entries,
                max_shard_bytes=1 << 62,
                filename=ADAPTER_FILE,
                metadata={"graft_base_fingerprint": b.fingerprint()},
            ) as writer:
                stats = run_pass(
                    targets,
                    lambda n: work(n, writer),
                    threads=threads or default_threads(),
                    input_bytes=pair.nbytes,
                    progress=progress,
                )
                writer.finish()
            write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        report = Report(stats, Path(out))
        report.untouched = [n for n in ft.names if n not in set(targets)]
        report.bytes_on_disk = os.path.getsize(Path(out) / ADAPTER_FILE)
        return report


def merge_adapters(
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    force: bool = False,
    overwrite_anything: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Merge LoRA adapters of one base into one adapter folder, one module at a time.

    Args:
        adapters: PEFT LoRA adapter folders (any ranks, scalings and target sets).
        weights: one per adapter (default 1 each): the merged update is Σ wᵢ ΔWᵢ.
        rank: re-factorize every module's summed update to this rank (truncated SVD);
            None concatenates the factors (exact, rank Σ rᵢ).
        threads, device, progress: as for `graft.plan.run_plan`.
        force, overwrite_anything: replace an existing ``out`` (`graft.io.check_output`).

    Returns:
        The report; ``bytes_on_disk`` is the adapter file's size.

    Raises:
        DeltaError: the adapters disagree on ``fan_in_fan_out`` or on a module's shape.
    """
    dev = resolve_device(device)
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise DeltaError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if rank is not None and rank < 1:
        raise DeltaError(f"--rank must be at least 1, got {rank}")
    opened: list[Delta] = []
    try:
        for path in adapters:
            if not is_adapter_dir(Path(path)):
                raise DeltaError(
                    f"{path} is not a PEFT LoRA adapter folder (no adapter_config.json); "
                    "`graft extract-lora BASE FINETUNED -o DIR` makes one from a fine-tune"
                )
            d = open_delta(path)
            opened.append(d)
            if d.method != "lora":
                raise DeltaError(f"{path} is not a PEFT LoRA adapter folder")
        transposes = {e.transpose for d in opened for e in d.layout.values()}
        if len(transposes) > 1:
            raise DeltaError(
                "the adapters disagree on fan_in_fan_out; they are for different bases"
            )
        names = sorted({n for d in opened for n in d.layout})
        planned = {n: _plan_module(n, opened, rank) for n in names}
        entries = []
        for name, (rows, cols, r, dtype) in planned.items():
            key = ADAPTER_PREFIX + name[: -len(".weight")]
            entries += [
                (f"{key}.lora_A.weight", dtype, (r, cols)),
                (f"{key}.lora_B.weight", dtype, (rows, r)),
            ]
        ranks = {n[: -len(".weight")]: planned[n][2] for n in names}
        config = adapter_config(
            opened[0].metadata.get("graft_base", ""),
            list(ranks),
            max(ranks.values(), default=rank or 1),
            fan_in_fan_out=transposes.pop() if transposes else False,
            ranks=ranks,
        )

        def work(name: str, writer: ShardedWriter) -> int:
            b, a = _merged_factors(name, opened, weights, rank, dev)
            key = ADAPTER_PREFIX + name[: -len(".weight")]
            writer.write(f"{key}.lora_A.weight", a)
            writer.write(f"{key}.lora_B.weight", b)
            return (a.numel() + b.numel()) * a.element_size()

        def read_bytes(name: str) -> int:
            return sum(d.nbytes(name) for d in opened if name in d.layout)

        with atomic_output_dir(
            Path(out), force=force, inputs=adapters, overwrite_anything=overwrite_anything
        ) as tmp:
            with ShardedWriter(
                tmp, entries, max_shard_bytes=1 << 62, filename=ADAPTER_FILE
            ) as writer:
                stats = run_pass(
                    names,
                    lambda n: work(n, writer),
                    threads=threads or default_threads(),
                    input_bytes=read_bytes,
                    progress=progress,
                )
                writer.finish()
            write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        report = Report(stats, Path(out))
        report.bytes_on_disk = os.path.getsize(Path(out) / ADAPTER_FILE)
        return report
    finally:
        for d in opened:
            d.close()


def _plan_module(name: str, adapters: list[Delta], rank: int | None):
    """``(rows, cols, rank, dtype)`` of the merged factors B (rows x rank), A (rank x cols)
    of one module, from the headers; the dtype is the last adapter's, as stored."""
    shapes, total, dims, dtype = set(), 0, None, torch.float32
    for d in adapters:
        entry = d.layout.get(name)
        if entry is None:
            continue
        b, a = (d.file.info(entry.parts[k]) for k in ("B", "A"))
        shapes.add(entry.shape)
        total += a.shape[0]
        dims, dtype = (b.shape[0], a.shape[1]), b.dtype
    if len(shapes) > 1:
        raise DeltaError(f"the adapters give {name} different shapes {sorted(shapes)}")
    rows, cols = dims
    r = total if rank is None else min(rank, min(rows, total), min(cols, total))
    return rows, cols, r, dtype


def _merged_factors(name, adapters: list[Delta], weights, rank, device="cpu"):
    """(B, A) of Σ wᵢ sᵢ Bᵢ Aᵢ for one module, concatenated or re-factorized."""
    bs, as_, dtype = [], [], torch.float32
    for d, w in zip(adapters, weights, strict=True):
        entry = d.layout.get(name)
        if entry is None:
            continue
        parts = d.read_parts(name)
        dtype = parts["B"].dtype
        bs.append(parts["B"].to(device=device, dtype=torch.float32) * (w * entry.scale))
        as_.append(parts["A"].to(device=device, dtype=torch.float32))
    b, a = torch.cat(bs, 1), torch.cat(as_, 0)
    if rank is not None:
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = truncated_svd(rb @ ra.T, rank=min(rank, rb.shape[0], ra.shape[0]))
        root = s.sqrt()
        b, a = qb @ (u * root), (root[:, None] * vh) @ qa.T
    return b.to(device="cpu", dtype=dtype).contiguous(), a.to(
        device="cpu", dtype=dtype
    ).contiguous()


class AdaptedCheckpoint:
    """A checkpoint with a LoRA adapter applied per tensor as it is read.

    Quacks like `graft.io.Checkpoint` (names, info, get, config, root, fingerprint,
    close), so a merge plan reads ``model+adapter`` inputs without a merged copy on disk.
    Adapted tensors are computed in float32 (W + s·B@A) and returned in W's dtype.
    """

    def __init__(self, base: Checkpoint, adapter: Delta):
        for name, entry in adapter.layout.items():
            if name not in base:
                raise DeltaError(
                    f"adapter {adapter.path} targets {name}, which {base.path} does not have; "
                    "give the base model the adapter was trained on"
                )
            if tuple(base.info(name).shape) != entry.shape:
                raise DeltaError(
                    f"adapter {adapter.path} has shape {entry.shape} for {name}, {base.path} has "
                    f"{tuple(base.info(name).shape)}; give the adapter's base model"
                )
        self.base, self.adapter = base, adapter
        self.path, self.root, self.names = base.path, base.root, base.names
        self.modules_root = base.modules_root
        self.metadata = base.metadata

    def __reduce__(self):
        # As `Checkpoint.__reduce__`: pickled as the two paths to open again.
        return (open_adapted, (Path(self.path).absolute(), Path(self.adapter.path).absolute()))

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({str(self.path)!r} + {str(self.adapter.path)!r})"

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    @property
    def config(self) -> dict | None:
        return self.base.config

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    @property
    def num_params(self) -> int:
        return self.base.num_params

    def info(self, name: str):
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        if name not in self.adapter.layout:
            return t
        return (t.float() + self.adapter.delta(name)).to(t.dtype)

    def fingerprint(self) -> str:
        """`Checkpoint.fingerprint` of the adapted weights: equal to the fingerprint of the
        same model merged and saved, so statistics computed on either are accepted."""
        h = hashlib.sha256()
        for name in sorted(self.names):
            info = self.info(name)
            h.update(f"{name}|{info.dtype}|{tuple(info.shape)}".encode())
            if name in self.adapter.layout:
                raw = self.get(name).contiguous().reshape(-1).view(torch.uint8)[:256]
                h.update(raw.numpy().tobytes())
            else:
                h.update(self.base.get_prefix(name, 256).numpy().tobytes())
        return h.hexdigest()[:32]

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> AdaptedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapted(model: str | os.PathLike, adapter: str | os.PathLike) -> AdaptedCheckpoint:
    """Open ``model`` with the LoRA adapter folder ``adapter`` applied per tensor."""
    base = open_model(model)
    try:
        d = open_delta(adapter)
    except BaseException:
        base.close()
        raise
    if d.method != "lora":
        base.close()
        d.close()
        raise DeltaError(f"{adapter} is not a PEFT LoRA adapter folder (adapter_config.json)")
    try:
        return AdaptedCheckpoint(base, d)
    except BaseException:
        base.close()
        d.close()
        raise
