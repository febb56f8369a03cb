#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, install, lint, tests (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: the CPU wheel (unpinned, the [hf] extra's torch would pull a CUDA build)
. launch/_venv.sh "[test,hf,eval,corpora]" "torch==2.13.0"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# Tests share one tokenised corpus per run; a fresh cache dir keeps CI honest.
export GPTJAX_CACHE=${GPTJAX_CACHE:-$(mktemp -d)/gptjax-cache}
# Two workers (pytest-xdist), each taking whole test files (--dist loadfile: a file's module
# fixtures are built once): much of a test's time is one thread compiling or a subprocess
# starting, so 2 workers on 2 cores take ~0.6x the serial time. GPTJAX_TEST_WORKERS=0: serial.
WORKERS=${GPTJAX_TEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then
  exec "$VENV/bin/python" -m pytest -q "$@"
fi
exec "$VENV/bin/python" -m pytest -q -n "$WORKERS" --dist loadfile "$@"
