#!/usr/bin/env bash
# A scaling experiment from a sweep spec: plan, run (resumable), report (results.csv, fits, plots).
#   ./launch/scaling.sh [SPEC] [--workers N]      (default configs/sweeps/cpu_isoflop.yaml)
# Stop it at any time and run it again: finished runs are kept, interrupted ones resume.
# Everything lands in the spec's dir (runs/sweeps/NAME); see docs/sweeps.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_venv.sh "[sweep]"
SPEC=${1:-configs/sweeps/cpu_isoflop.yaml}
shift || true
"$VENV/bin/gptjax" sweep plan "$SPEC"
"$VENV/bin/gptjax" sweep run "$SPEC" "$@"
"$VENV/bin/gptjax" sweep report "$SPEC"
