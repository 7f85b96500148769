"""Mutation testing of graft's merge and delta math with mutmut: would the tests notice
if the code were subtly wrong? A developer tool; mutmut is not a graft dependency and
this does not run in CI.

    .venv/bin/pip install mutmut
    .venv/bin/python benchmarks/mutation.py                       # all of merge/ and delta/
    .venv/bin/python benchmarks/mutation.py ties dare della compeft  # some modules
    .venv/bin/python benchmarks/mutation.py --show graft.merge.dare.x_dare_ties__mutmut_3

mutmut rewrites every function of the chosen modules into variants (an operator, a
constant, an argument changed) and runs, for each variant, the tests that execute that
function; a variant no test fails on *survives*. The run happens in a copy of the
repository (mutmut writes a ``mutants/`` tree and reads its settings from the copy's
pyproject.toml), so the checkout is left as it was. The copy is kept (``--workdir``) so
``--show`` and a rerun (which only reruns what changed) can use it.

Prints killed / total per module (timeouts count as killed, as mutmut's own score does;
"no tests" are variants of functions the selected tests never call) and the survivors.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "delta")
TESTS = (
    "tests/test_merge_methods.py",
    "tests/test_merge_invariants.py",
    "tests/test_merge_select.py",
    "tests/test_delta.py",
    "tests/test_lora.py",
)
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "graft-mutation"


def _modules(names: list[str]) -> list[str]:
    """``src/graft/<package>/<name>.py`` globs for the named modules (all when none)."""
    if not names:
        return [f"src/graft/{p}/*" for p in PACKAGES]
    globs = []
    for name in names:
        found = [
            f"src/graft/{p}/{name}.py"
            for p in PACKAGES
            if (REPO / f"src/graft/{p}/{name}.py").is_file()
        ]
        if not found:
            raise SystemExit(f"no module {name}.py in src/graft/{{{','.join(PACKAGES)}}}")
        globs += found
    return globs


def _config(only_mutate: list[str], tests: list[str], deselect: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    pytest_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow and not mergekit"]
    pytest_args += [a for d in deselect for a in ("--deselect", d)]
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list(only_mutate)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(pytest_args)}\n"
        'process_isolation = "forkserver"\n'  # torch is not fork-safe once it has threads
        "use_git_change_detection = false\n"
    )


def _prepare(workdir: Path, config: str) -> None:
    """A fresh copy of src/, tests/ and pyproject.toml (with the mutmut settings)."""
    for name in ("src", "tests"):
        shutil.rmtree(workdir / name, ignore_errors=True)
        shutil.copytree(
            REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    (workdir / "pyproject.toml").write_text(text + config, encoding="utf-8")


def _mutmut(workdir: Path, *args: str, capture: bool = False) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit("mutmut is not installed: .venv/bin/pip install mutmut")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [str(exe), *args],
        cwd=workdir,
        env=env,
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    if done.returncode != 0 and not capture:
        raise SystemExit(f"mutmut {' '.join(args)} failed (exit {done.returncode})")
    return done.stdout or ""


def _report(results: str) -> None:
    """Per module: killed / scored, where scored excludes mutants mutmut skipped."""
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for line in results.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" not in name:
            continue
        module = name.rsplit(".", 1)[0]
        by_module[module][status] += 1
        if status in ("survived", "no tests"):
            survivors.append(f"{name}: {status}")
    total = collections.Counter()
    print(f"{'module':32s} {'killed':>7s} {'scored':>7s} {'score':>7s}  survived  no tests")
    for module, c in sorted(by_module.items()):
        total += c
        _row(module, c)
    _row("all", total)
    if survivors:
        print("\nsurvivors (`--show NAME` prints the diff):")
        print("\n".join(f"  {s}" for s in survivors))


def _row(label: str, c: collections.Counter) -> None:
    killed = c["killed"] + c["timeout"]
    scored = sum(c.values()) - c["skipped"] - c["not checked"]
    score = f"{killed / scored:.1%}" if scored else "-"
    print(
        f"{label:32s} {killed:7d} {scored:7d} {score:>7s}  {c['survived']:8d}  {c['no tests']:8d}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module names, e.g. ties dare (default: all)")
    parser.add_argument("--tests", nargs="+", default=list(TESTS), help="test files to run")
    parser.add_argument(
        "--deselect", action="append", default=[], help="a test to leave out (pytest node id)"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--show", metavar="MUTANT", help="print one mutant's diff and exit")
    args = parser.parse_args()
    if args.show:
        print(_mutmut(args.workdir, "show", args.show, capture=True))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    _prepare(args.workdir, _config(_modules(args.modules), args.tests, args.deselect))
    _mutmut(args.workdir, "run", "--max-children", str(args.max_children))
    _report(_mutmut(args.workdir, "results", "--all", "true", capture=True))


if __name__ == "__main__":
    main()
