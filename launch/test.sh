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
exec "$VENV/bin/python" -m pytest -q "$@"
