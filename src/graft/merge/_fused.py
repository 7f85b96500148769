"""The fused CPU kernel of the TIES family: one C pass per tensor instead of a dozen torch ones.

TIES, DARE-TIES, Breadcrumbs-TIES and DELLA all do, per element and model: delta, a
sparsifier (trim / random drop / band), weight, sign election, agreeing sums, divisor,
``θ₀ + λ·merged``. In torch that is about a dozen passes over float32 copies of the
inputs; `_fused.c` does it in one pass over the inputs *as stored* (float32, bfloat16 or
float16, widened exactly), plus two histogram passes for an exact trim threshold. It
performs the same float32 operations in the same order as the torch path of
`graft.merge._task_vectors` (no FMA contraction), so both give the same bytes; the tests
hold them to it (``tests/test_merge_fused.py``).

Why a small C file through ctypes rather than numba or ``torch.compile``: see
``docs/methods.md`` ("The fused kernel"). It is compiled on first use with the system's C
compiler into ``$GRAFT_KERNEL_CACHE`` (default ``~/.cache/graft/kernels``), keyed by the
source's hash. Without a compiler, or with ``GRAFT_FUSED=0``, every caller takes the torch
path: same results, slower.

Each wrapper returns ``None`` where the kernel does not apply (non-CPU or float64 inputs,
more than 64 models, a NaN/Inf input, ...); the caller then runs its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("_fused.c")
# -march=native: the vector units make the merge pass ~3x faster; the cached library is
# keyed by this CPU's feature flags, so a home folder shared between machines stays safe.
# -ffp-contract=off: no FMA contraction, every float32 step rounds as torch's does.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_MODELS = 64
_MAX_CUTS = 256
_MAX_NUMEL = (1 << 32) - 1  # histogram counts are uint32

_lock = threading.Lock()
_state: dict[str, object] = {}

# per-model sparsifiers (the M_* modes of _fused.c)
DENSE, ZERO_MUL, TOPK_MUL, BAND, MASK, ZERO, PROB = range(7)


def _cache_dir() -> Path:
    env = os.environ.get("GRAFT_KERNEL_CACHE")
    if env:
        return Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "graft" / "kernels"


def _cpu_flags() -> str:
    """This CPU's feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source = _SRC.read_bytes()
    key = " ".join((cc, *_FLAGS, _cpu_flags())).encode()
    tag = hashlib.sha256(source + key).hexdigest()[:16]
    out = _cache_dir() / f"graft_fused-{tag}-{os.uname().machine}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run(
                [cc, *_FLAGS, "-o", tmp, str(_SRC)], check=True, capture_output=True, timeout=120
            )
            os.replace(tmp, out)  # atomic: concurrent builders agree on the result
        except (OSError, subprocess.SubprocessError):
            Path(tmp).unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(out))
    lib.graft_select.restype = ctypes.c_int
    lib.graft_merge.restype = ctypes.c_int
    lib.graft_della_probs.restype = ctypes.c_int
    lib.graft_finite.restype = ctypes.c_int
    lib.graft_mt_keep.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, a failed build, or ``GRAFT_FUSED=0``)."""
    if os.environ.get("GRAFT_FUSED", "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except OSError:
                _state["lib"] = None
        return _state["lib"]  # type: ignore[return-value]


@dataclass
class Sparsifier:
    """One model's sparsifier in the fused pass.

    ``mode`` is one of the module constants. ``k`` / ``k2``: entries kept by the top-k
    cut(s) (``TOPK_MUL``: the ``k`` largest |δ|, ties to the lower index; ``BAND``: the
    ``k`` largest minus the ``k2`` largest, ties to the higher index). ``mask``: a bool
    keep-mask (``MASK``, ``PROB``); ``p``: the divisor of kept entries (``MASK`` with
    rescale); ``probs``: float32 keep probabilities (``PROB``; with no mask, +0 marks a
    dropped entry: `della_probs` with a generator).
    """

    mode: int = DENSE
    k: int = 0
    k2: int = 0
    mask: torch.Tensor | None = None
    p: float = 1.0
    probs: torch.Tensor | None = None


def usable(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> bool:
    """Whether the fused kernel can run on these inputs (it then also needs `library`)."""
    n = base.numel()
    if not (0 < n <= _MAX_NUMEL and 1 <= len(tensors) <= _MAX_MODELS):
        return False
    return all(
        t.device.type == "cpu" and t.dtype in _CODES and t.shape == base.shape
        for t in (*tensors, base)
    )


def random_mask_usable(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    generator: torch.Generator | None,
    *,
    elect: bool,
    rescale: bool,
    rescale_mode: str,
) -> bool:
    """Whether a random-mask method (DARE-TIES, DELLA) can take the fused path: a CPU
    generator (the masks are drawn as the torch path draws them), sign election, no L1
    rescale, and inputs `usable` accepts."""
    return (
        generator is not None
        and generator.device.type == "cpu"
        and elect
        and not (rescale and rescale_mode == "l1")
        and usable(tensors, base)
    )


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether no entry of ``t`` is NaN or Inf, in one vectorised pass over its stored
    bytes; None where the kernel does not apply (not a contiguous CPU float32 / bfloat16 /
    float16 tensor, or no kernel)."""
    if t.device.type != "cpu" or t.dtype not in _CODES or not t.is_contiguous():
        return None
    lib = library()
    if lib is None:
        return None
    return bool(
        lib.graft_finite(ctypes.c_void_p(t.data_ptr()), _CODES[t.dtype], ctypes.c_int64(t.numel()))
    )


_MT_STATE_BYTES = 5056  # torch's CPU generator state (Generator.get_state())


def keep_mask(
    n: int,
    generator: torch.Generator,
    p: float = 0.0,
    probs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``torch.rand(n, generator=generator) < p`` (``< probs`` when given, float32 of n),
    drawn in C from the generator's own MT19937 state, which is then advanced exactly as
    torch.rand advances it: the same masks and the same stream after, without torch's
    serial per-entry draw (4-8 ns per entry here, 0.7 ns in C). None where this does not apply (no
    kernel, a non-CPU generator, a state this torch build lays out differently: checked
    once per process against torch.rand); the caller then draws with torch. Like
    torch.rand, not for one generator shared by threads at once."""
    if generator.device.type != "cpu" or not _mt_matches_torch():
        return None
    return _mt_keep(n, generator, p, probs)


def _mt_state(generator: torch.Generator) -> torch.Tensor | None:
    """The generator's state bytes as the C side reads them; None: another layout."""
    state = generator.get_state()
    ok = state.numel() == _MT_STATE_BYTES and state.dtype == torch.uint8
    return state if ok else None


def _mt_keep(n, generator, p, probs):
    lib = library()
    state = _mt_state(generator)
    if lib is None or state is None:
        return None
    if probs is not None:
        probs = probs.contiguous()
        if probs.dtype != torch.float32 or probs.numel() != n or probs.device.type != "cpu":
            return None
    keep = torch.empty(n, dtype=torch.bool)
    rc = lib.graft_mt_keep(
        ctypes.c_void_p(state.data_ptr()), ctypes.c_int64(n), ctypes.c_float(p),
        ctypes.c_void_p(probs.data_ptr() if probs is not None else 0),
        ctypes.c_void_p(keep.data_ptr()),
    )  # fmt: skip
    if rc != 0:
        return None
    generator.set_state(state)
    return keep


def twin_generators(seed: int, skip: int) -> tuple[torch.Generator, torch.Generator]:
    """Two CPU generators in the same state: seeded with ``seed``, then ``skip`` draws."""
    ref = torch.Generator().manual_seed(seed)
    if skip:
        torch.rand(skip, generator=ref)
    mine = torch.Generator()
    mine.set_state(ref.get_state())
    return ref, mine


def _mt_matches_torch() -> bool:
    """Once per process: `_mt_keep` against torch.rand, masks and the state after, from a
    fresh and from an advanced generator, across the 624-word refills, with a scalar p
    that float32 rounds and with per-entry probabilities."""
    with _lock:
        if "mt" in _state:
            return _state["mt"]  # type: ignore[return-value]
    ok = True
    for seed, skip, n in ((1234, 0, 2000), (99, 617, 1500), (7, 1, 624)):
        ref, mine = twin_generators(seed, skip)
        probs = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1))
        u = torch.rand(n, generator=ref)
        got = _mt_keep(n, mine, 0.3, None)
        ok = ok and got is not None and torch.equal(got, u < 0.3)
        ok = ok and torch.equal(ref.get_state(), mine.get_state())
        u = torch.rand(n, generator=ref)
        got = _mt_keep(n, mine, 0.0, probs)
        ok = ok and got is not None and torch.equal(got, u < probs)
        ok = ok and torch.equal(ref.get_state(), mine.get_state())
    with _lock:
        _state["mt"] = ok
    return ok


def _ptrs(ts: Sequence[torch.Tensor | None]):
    return (ctypes.c_void_p * len(ts))(*[0 if t is None else t.data_ptr() for t in ts])


def _arr(ctype, values):
    return (ctype * max(1, len(values)))(*values)


def _cuts(sparse: Sequence[Sparsifier], n: int):
    """The top-k cuts to resolve: (model, k, ties high) and each model's two cut slots.

    A slot is a cut index, -1 (keeps nothing) or -2 (keeps everything).
    """
    cuts: list[tuple[int, int, int]] = []
    slots_a, slots_b = [], []
    for m, s in enumerate(sparse):
        slot = []
        for k, used in ((s.k, s.mode in (TOPK_MUL, BAND)), (s.k2, s.mode == BAND)):
            if not used or k <= 0:
                slot.append(-1)
            elif k >= n:
                slot.append(-2)
            else:
                slot.append(len(cuts))
                cuts.append((m, k, int(s.mode == BAND)))
        slots_a.append(slot[0])
        slots_b.append(slot[1])
    return cuts, slots_a, slots_b


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    sparse: Sequence[Sparsifier],
    *,
    weight: Sequence[float],
    normalize: bool,
    scale: float,
    rescale: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """Sparsify, weight, elect and disjoint-merge (`_task_vectors.combine` with
    ``elect=True``), then ``θ₀ + λ·merged``: the result, or None where the kernel does not
    apply. ``rescale``: ``MASK`` / ``PROB`` entries kept are divided by ``p`` / their
    probability. ``out_dtype`` (default float32): the kernel rounds bfloat16 / float16
    results itself, as ``.to(out_dtype)`` of the float32 result would; other dtypes are
    cast by torch."""
    lib = library()
    if lib is None or not usable(tensors, base):
        return None
    tensors = [t.contiguous() for t in tensors]
    base = base.contiguous()
    n, T = base.numel(), len(tensors)
    cuts, slot_a, slot_b = _cuts(sparse, n)
    if len(cuts) > _MAX_CUTS:
        return None
    fts, dts = _ptrs(tensors), _arr(ctypes.c_int32, [_CODES[t.dtype] for t in tensors])
    bptr, bdt = ctypes.c_void_p(base.data_ptr()), _CODES[base.dtype]
    vstar, need, total = (_arr(ctypes.c_int64, [0] * len(cuts)) for _ in range(3))
    if cuts:
        rc = lib.graft_select(
            ctypes.c_int64(n), T, bptr, bdt, fts, dts, len(cuts),
            _arr(ctypes.c_int32, [c[0] for c in cuts]),
            _arr(ctypes.c_int64, [c[1] for c in cuts]),
            vstar, need, total,
        )  # fmt: skip
        if rc != 0:
            return None
    weights = [float(w) for w in weight]
    masks = [None if s.mask is None else s.mask.contiguous().view(torch.uint8) for s in sparse]
    probs = [None if s.probs is None else s.probs.contiguous() for s in sparse]
    narrow = out_dtype if out_dtype in _CODES else torch.float32
    out = torch.empty(base.shape, dtype=narrow)
    # rc 4, a NaN result: its bit pattern is torch's cast's to choose (the torch path)
    rc = lib.graft_merge(
        ctypes.c_int64(n), T, bptr, bdt, fts, dts,
        _arr(ctypes.c_int32, [s.mode for s in sparse]),
        _arr(ctypes.c_int32, slot_a), _arr(ctypes.c_int32, slot_b),
        len(cuts), vstar, need, total, _arr(ctypes.c_int32, [c[2] for c in cuts]),
        _ptrs(masks), _ptrs(probs),
        _arr(ctypes.c_float, [s.p for s in sparse]),
        int(rescale),
        _arr(ctypes.c_float, weights),
        int(any(w != 1.0 for w in weights)), int(len(set(weights)) == 1),
        int(normalize), int(scale != 1), ctypes.c_float(scale),
        _CODES[narrow], ctypes.c_void_p(out.data_ptr()),
    )  # fmt: skip
    if rc != 0:
        return None
    return out if out_dtype is None else out.to(out_dtype)


def della_probs(
    tensor: torch.Tensor,
    base: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """`graft.merge.della.della_keep_probs` of ``tensor - base``, computed from the stored
    inputs without a float32 delta or argsort; None where the kernel does not apply.

    With a CPU ``generator`` MagPrune's draw is made in the same pass, as `keep_mask`
    would make it (``torch.rand(shape) < probs``, the generator advanced likewise): the
    result is then each entry's probability where it is kept and +0 where it is dropped
    (a ``PROB`` sparsifier with no mask). None also where that draw does not apply."""
    lib = library()
    if lib is None or not usable([tensor], base):
        return None
    state = None
    if generator is not None:
        if generator.device.type != "cpu" or not _mt_matches_torch():
            return None
        state = _mt_state(generator)
        if state is None:
            return None
    tensor, base = tensor.contiguous(), base.contiguous()
    rows = base.shape[0] if base.dim() >= 2 else 1
    cols = base.numel() // rows
    out = torch.empty(base.shape, dtype=torch.float32)
    rc = lib.graft_della_probs(
        ctypes.c_int64(rows), ctypes.c_int64(cols),
        ctypes.c_void_p(base.data_ptr()), _CODES[base.dtype],
        ctypes.c_void_p(tensor.data_ptr()), _CODES[tensor.dtype],
        ctypes.c_float(density - epsilon), ctypes.c_float(2 * epsilon),
        ctypes.c_void_p(state.data_ptr() if state is not None else 0),
        ctypes.c_void_p(out.data_ptr()),
    )  # fmt: skip
    if rc != 0:
        return None
    if state is not None:
        generator.set_state(state)
    return out
