#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, install, lint, tests (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_venv.sh "[test]"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# Tests share one tokenised corpus per run; a fresh cache dir keeps CI honest.
export GPTJAX_CACHE=${GPTJAX_CACHE:-$(mktemp -d)/gptjax-cache}
exec "$VENV/bin/python" -m pytest -q "$@"
