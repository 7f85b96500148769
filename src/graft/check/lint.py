"""`lint`: what is risky or broken in a checkpoint, found without executing anything.

Pickles (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``) are scanned as bytes
(`graft.check.pickle_scan`, which fails closed: what it cannot resolve is a risk);
tensors are read only when every pickle of the checkpoint imports nothing outside the
allowlist and the scan resolved everything, and then only through graft's reader
(safetensors, or ``torch.load(weights_only=True)``), one tensor at a time
(`graft.check.weights` says what is checked). With ``data`` (or ``task``), the model
card's ``model-index`` accuracy claims are compared with the accuracy measured there.

Findings have a severity: ``risk`` (code a pickle would run), ``error`` (NaN/Inf),
``warning`` (everything else worth a look) or ``info``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from graft.check.pickle_scan import scan_file
from graft.check.weights import (
    DEGENERATE_WARN_FRACTION,
    conv_filters,
    digest,
    dtype_anomalies,
    value_stats,
)
from graft.io import (
    GraftIOError,
    model_files,
    open_binary,
    open_checkpoint,
    read_model_card,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_OTHER_FORMATS = (".safetensors", ".gguf")  # weights formats that hold no pickle
CLAIM_TOLERANCE = 0.02  # accuracy points (as a fraction) a claim may exceed the measurement


def lint_path(
    path: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    task: str | None = None,
    zoo: str | os.PathLike = "graft-demo/zoo",
    tolerance: float = CLAIM_TOLERANCE,
) -> dict:
    """Lint a model folder or a single weights / pickle file (module doc).

    Returns:
        ``{"path", "files", "findings", "conv_layers", "tensors", "claims", "ok"}``;
        ``ok`` is False when a finding is a risk or an error.

    Raises:
        GraftIOError: nothing readable at ``path``.
    """
    files = model_files(path)
    is_dir = files != [Path(path)]
    if not files:
        raise GraftIOError(f"no weights or pickle files in {path}; pass a model folder or file")
    findings: list[dict] = []
    scanned = []
    for f in files:
        named = not is_dir and f.suffix not in (*PICKLE_SUFFIXES, *_OTHER_FORMATS)
        if f.suffix not in PICKLE_SUFFIXES and not named:
            continue
        # A file named on its own whatever its extension (a pickle renamed .joblib, .dat,
        # or with none) is scanned too: only what is not a pickle at all is refused.
        scans = _scan_pickles(f)
        if named and all(_not_a_pickle(scan) for scan in scans):
            raise GraftIOError(
                f"{f} is neither a safetensors file nor a pickle (torch, joblib...); "
                "graft lint reads checkpoints: pass a model folder or a weights file"
            )
        for scan in scans:
            scanned.append(scan)
            findings += _pickle_findings(scan)
    report = {
        "path": str(path),
        "files": [str(f) for f in files],
        "pickles": scanned,
        "conv_layers": [],
        "tensors": 0,
        "params": 0,
        "claims": [],
    }
    risky = any(x["severity"] == "risk" for x in findings)
    readable = [f for f in files if f.suffix in TENSOR_SUFFIXES]
    if risky:
        findings.append(_finding("info", "tensors", "tensors not read: a pickle is unsafe"))
    elif readable:
        target = path if is_dir else readable[0]
        findings += _tensor_checks(target, report)
    if data is not None or task is not None:
        findings += _claims(path, is_dir, data, task, zoo, tolerance, report)
    report["findings"] = findings
    report["ok"] = not any(x["severity"] in ("risk", "error") for x in findings)
    return report


def _not_a_pickle(scan: dict) -> bool:
    """The stream fails at its first byte: some other kind of file, not a pickle."""
    return not scan["globals"] and any(
        why.startswith("malformed pickle at byte 0:") for why in scan["issues"]
    )


def _scan_pickles(f: Path) -> list[dict]:
    # The scan needs the whole file as a seekable stream (zip members, the bytes after the
    # pickles), and reads it as bytes only; nothing is unpickled.
    try:
        with open_binary(f) as handle:
            return scan_file(handle, f.name)
    except OSError as e:
        raise GraftIOError(f"cannot read {f}: {' '.join(str(e).split())}; check the file") from e


def _pickle_findings(scan: dict) -> list[dict]:
    stream = scan["file"]
    findings = [
        _finding(
            "risk",
            "pickle",
            f"{stream} imports {g['module']}.{g['name']} ({g['verdict']}): "
            "unpickling it can run code; do not torch.load it without weights_only",
        )
        for g in scan["globals"]
        if g["verdict"] != "safe"
    ]
    findings += [
        _finding(
            "risk",
            "pickle",
            f"{stream}: {why}; the scan cannot vouch for what unpickling it runs, "
            "so it is treated as unsafe (do not torch.load it without weights_only)",
        )
        for why in scan["issues"]
    ]
    return findings


def _finding(severity: str, check: str, message: str, tensor: str | None = None) -> dict:
    out = {"severity": severity, "check": check, "message": message}
    if tensor is not None:
        out["tensor"] = tensor
    return out


def _tensor_checks(target, report: dict) -> list[dict]:
    findings, seen, dtypes, zero_vectors = [], {}, {}, []
    with open_checkpoint(target) as ckpt:
        config_dtype = (ckpt.config or {}).get("torch_dtype")
        for name in ckpt.names:
            t = ckpt.get(name)
            dtypes[name] = t.dtype
            report["tensors"] += 1
            report["params"] += t.numel()
            s = value_stats(t)
            if s["nan"] or s["inf"]:
                findings.append(
                    _finding(
                        "error",
                        "nan_inf",
                        f"{name} has {s['nan']} NaN and {s['inf']} Inf values of {t.numel()}",
                        name,
                    )
                )
            if s["all_zero"] and t.ndim < 2:
                zero_vectors.append(name)  # a zero bias is an ordinary initialisation
            elif s["all_zero"]:
                message = f"{name} is all zeros (shape {list(t.shape)})"
                findings.append(_finding("warning", "all_zero", message, name))
            elif not s["constant"] and t.numel() > 1:
                seen.setdefault(digest(t), []).append(name)
            conv = conv_filters(t)
            if conv is not None:
                report["conv_layers"].append({"tensor": name, **conv})
                bad = conv["near_zero"] + conv["near_constant"]
                if bad > DEGENERATE_WARN_FRACTION:
                    findings.append(
                        _finding(
                            "warning",
                            "degenerate_filters",
                            f"{name}: {conv['near_zero']:.0%} of {conv['filters']} filters near zero, "
                            f"{conv['near_constant']:.0%} near constant",
                            name,
                        )
                    )
    if zero_vectors:
        shown = ", ".join(zero_vectors[:5]) + (", ..." if len(zero_vectors) > 5 else "")
        message = f"{len(zero_vectors)} vectors are all zeros (biases at initialisation?): {shown}"
        findings.append(_finding("info", "all_zero", message))
    for names in seen.values():
        if len(names) > 1:
            findings.append(
                _finding(
                    "warning",
                    "duplicate",
                    f"identical tensors: "
                    f"{', '.join(names)} (tied weights stored twice, or a copy "
                    "where a trained tensor was expected)",
                )
            )
    findings += [_finding("warning", "dtype", m) for m in dtype_anomalies(dtypes, config_dtype)]
    return findings


def _claims(path, is_dir: bool, data, task, zoo, tolerance: float, report: dict) -> list[dict]:
    from graft.check.run import measure_accuracy
    from graft.data._loading import NonFiniteModelError

    try:
        card = read_model_card(path) if is_dir else None
    except GraftIOError as e:  # a broken card is a finding, not the end of the lint
        return [_finding("warning", "claims", f"model card not read: {e}")]
    notes: list[str] = []
    claims = _accuracy_claims(card or {}, notes)
    findings = [_finding("warning", "claims", f"model card: {n}") for n in notes[:5]]
    if not claims:
        return [
            *findings,
            _finding("info", "claims", "no accuracy in the model card's model-index"),
        ]
    try:
        measured = measure_accuracy(path, task=task, data=data, zoo=zoo)
    except NonFiniteModelError as e:
        # the tensor checks report the NaN/Inf themselves; the claims cannot be checked
        return [*findings, _finding("error", "claims", f"accuracy not measured: {e}")]
    for c in claims:
        gap = c["claimed"] - measured["accuracy"]
        row = {
            **c,
            "measured": measured["accuracy"],
            "n": measured["n"],
            "data": measured["data"],
            "gap": gap,
        }
        report["claims"].append(row)
        if gap > tolerance:
            findings.append(
                _finding(
                    "warning",
                    "claims",
                    f"model card claims accuracy {c['claimed']:.2%} on {c['dataset']}; measured "
                    f"{measured['accuracy']:.2%} on {measured['data']} (n={measured['n']})",
                )
            )
    return findings


def _accuracy_claims(card: dict, notes: list[str] | None = None) -> list[dict]:
    """``{"dataset", "claimed"}`` per accuracy metric in ``model-index`` (percent → fraction).

    Entries of the wrong type are skipped; with ``notes``, a line per skipped one is added.
    """
    notes = [] if notes is None else notes
    out = []
    entries = card.get("model-index")
    if entries is not None and not isinstance(entries, list):
        notes.append(f"model-index is not a list ({type(entries).__name__}); claims skipped")
    for entry in entries if isinstance(entries, list) else []:
        results = entry.get("results") if isinstance(entry, dict) else None
        for result in results if isinstance(results, list) else []:
            if not isinstance(result, dict):
                continue
            dataset = result.get("dataset")
            dataset = dataset if isinstance(dataset, dict) else {}
            name = " ".join(str(dataset.get("name") or dataset.get("type") or "?").split())[:80]
            metrics = result.get("metrics")
            for m in metrics if isinstance(metrics, list) else []:
                if not isinstance(m, dict):
                    continue
                kind = str(m.get("type", "")).lower()
                value = m.get("value")
                if "acc" not in kind:
                    continue
                if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                    shown = repr(value)[:40]
                    notes.append(f"accuracy claim on {name} is {shown}, not a non-negative number")
                    continue
                out.append(
                    {
                        "dataset": name,
                        "metric": kind,
                        "claimed": value / 100 if value > 1 else float(value),
                    }
                )
    return out
