"""The I/O floor of a merge: read every input tensor once, write one model-sized output.

No merge math, no planning: ``safe_open`` + ``get_tensor`` (+ ``clone``, which forces the
bytes in: recent safetensors hand back lazy mmap views) on every tensor of every input
model (in its stored dtype), then ``save_file`` of one model's worth of tensors (the
first input's) into OUT/model.safetensors. A merge tool cannot beat this by much on the
same disk and cache state (the process exits without tearing the interpreter down, as
``graft`` does); ``benchmarks/merge.py`` runs it as a subprocess between the
tool runs and reports ``tool time / floor time``.

With ``--device cuda`` it is the floor of a GPU merge: every input tensor is also copied
to the GPU (through pinned memory, asynchronously), and the output comes back from the
GPU before it is written.

    python benchmarks/io_floor.py [--device cuda] OUT_DIR MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    return sorted(model_dir.glob("*.safetensors"))


def main(argv: list[str]) -> int:
    device = None
    if argv[:1] == ["--device"] and len(argv) > 1:
        device, argv = (argv[1] if argv[1] != "cpu" else None), argv[2:]
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(argv[0])
    models = [Path(m) for m in argv[1:]]
    t0 = time.perf_counter()
    keep = {}
    read = 0
    for i, model in enumerate(models):
        for f in shard_files(model):
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    # get_tensor may return a lazy view of the mmap (safetensors 0.8
                    # does): clone() faults every page in and copies it, like a read().
                    t = st.get_tensor(name)
                    t = t.clone() if device is None else t.pin_memory()
                    read += t.numel() * t.element_size()
                    if device is not None:
                        t = t.to(device, non_blocking=True)
                    if i == 0:
                        keep[name] = t
                    del t
    if device is not None:
        keep = {name: t.cpu() for name, t in keep.items()}  # back from the GPU (synchronises)
    t_read = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    written = sum(t.numel() * t.element_size() for t in keep.values())
    total = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "bytes_read": read,
                "bytes_written": written,
                "read_s": round(t_read, 3),
                "seconds": round(total, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # No interpreter teardown (about half a second with torch loaded), as `graft` skips
    # it too: the floor counts only what a merge cannot avoid.
    sys.stdout.flush()
    os._exit(code)
