#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, install, lint, tests (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPTJAX_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# Tests share one tokenised corpus per run; a fresh cache dir keeps CI honest.
export GPTJAX_CACHE=${GPTJAX_CACHE:-$(mktemp -d)/gptjax-cache}
exec "$VENV/bin/python" -m pytest -q "$@"
