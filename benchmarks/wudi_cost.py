"""Cost of WUDI-Merging per tensor: the closed form, graft's Adam, and the reference's Adam.

For one ``out × in`` tensor and T tasks, graft builds ``G = Σ δᵢᵀδᵢ/nᵢ`` and
``B = Σ δᵢδᵢᵀδᵢ/nᵢ`` once (2T products of ``out·in²``), then

* ``closed_form``: one eigendecomposition of ``G`` (``in × in``) and two products;
* ``adam``: one ``(out × in)(in × in)`` product per step (300 steps at the paper's settings);

the reference differentiates the loss itself: 2T products of ``out²·in`` per step. Adam's
steps cost the same each, so ``--steps`` (default 10) are timed and the 300-step time is
setup + 300 × the mean step; likewise one reference step is timed. Random base, deltas of
scale 1e-3, float32, the tensor functions called directly (no I/O). Wall seconds and, since
a shared machine inflates them, process CPU seconds (all torch threads) per phase.

    python benchmarks/wudi_cost.py [--shape 4096x4096] [--tasks 8] [--steps 10]
        [--device cpu|cuda] [--reference-steps 1] [--out results/wudi-cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from graft.merge.wudi import adam, closed_form, interference_terms

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CPU: dict[str, float] = {}  # phase -> process CPU seconds (all threads), contention aside


def _timed(fn, device: str, phase: str = "") -> tuple[float, object]:
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    CPU[phase] = time.process_time() - cpu
    return time.perf_counter() - start, out


def reference_step_seconds(deltas: torch.Tensor, steps: int, device: str) -> float:
    """Mean seconds of the reference's autograd Adam step (loss, backward, step)."""
    merging = torch.nn.Parameter(deltas.sum(0))
    opt = torch.optim.Adam([merging], lr=1e-5)
    norms = deltas.reshape(len(deltas), -1).norm(dim=-1).square()

    def run():
        for _ in range(steps):
            inner = torch.matmul(merging.unsqueeze(0) - deltas, deltas.transpose(1, 2))
            loss = (inner.square() / norms[:, None, None]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    seconds, _ = _timed(run, device, "reference")
    return seconds / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reference-steps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "wudi-cost.json")
    args = ap.parse_args()
    out_dim, in_dim = (int(x) for x in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(out_dim, in_dim, generator=g).to(args.device)
    models = [
        base + 1e-3 * torch.randn(out_dim, in_dim, generator=g).to(args.device)
        for _ in range(args.tasks)
    ]
    setup, (gram, target, total) = _timed(
        lambda: interference_terms(models, base, torch.float32), args.device, "setup"
    )
    solve, _ = _timed(lambda: closed_form(gram, target), args.device, "solve")
    stepping, _ = _timed(
        lambda: adam(gram, target, total.clone(), steps=args.steps, lr=1e-5), args.device, "adam"
    )
    step = stepping / args.steps
    result = {
        "shape": [out_dim, in_dim],
        "tasks": args.tasks,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "setup_G_B_seconds": round(setup, 2),
        "closed_form_seconds": round(setup + solve, 2),
        "closed_form_solve_seconds": round(solve, 2),
        "adam_step_seconds": round(step, 3),
        "adam_300_steps_seconds": round(setup + 300 * step, 1),
        "cpu_seconds": {
            "setup_G_B": round(CPU["setup"], 2),
            "closed_form": round(CPU["setup"] + CPU["solve"], 2),
            "adam_step": round(CPU["adam"] / args.steps, 3),
            "adam_300_steps": round(CPU["setup"] + 300 * CPU["adam"] / args.steps, 1),
        },
    }
    if args.reference_steps > 0:
        stack = torch.stack([m - base for m in models])
        ref = reference_step_seconds(stack, args.reference_steps, args.device)
        result["reference_step_seconds"] = round(ref, 2)
        result["reference_300_steps_seconds"] = round(300 * ref, 0)
        result["cpu_seconds"]["reference_step"] = round(CPU["reference"] / args.reference_steps, 2)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
