#!/usr/bin/env bash
# A config-driven scaling sweep: the same data, schedule and token budget for several model
# widths, then one table of (parameters, FLOPs, final validation loss and bits per byte).
#   ./launch/scaling.sh [CONFIG] [key=value ...]     (default configs/quickstart.yaml)
# Each size is a normal run directory under runs/scaling/, so it can be resumed, sampled,
# evaluated and plotted like any other. Override SIZES to choose the widths (d_model:n_head).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/quickstart.yaml}
shift || true
SIZES=${SIZES:-"64:2 128:2 256:4"}
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
GPTJAX="$PYTHON -m gptjax"
dirs=()
for size in $SIZES; do
  width=${size%%:*}; heads=${size##*:}
  run_dir=runs/scaling/d${width}
  $GPTJAX train "$CONFIG" model.d_model="$width" model.n_head="$heads" \
    run_dir="$run_dir" "$@" --no-progress >/dev/null
  dirs+=("$run_dir")
done
"$PYTHON" - "${dirs[@]}" <<'PY'
import json, sys
from pathlib import Path
from gptjax import config, metrics
print(f"{'run':<22}{'params':>12}{'non-emb':>12}{'tokens':>12}{'FLOPs':>10}{'eval loss':>11}{'bpb':>8}")
for run in sys.argv[1:]:
    cfg = config.load(Path(run, "config.yaml"))
    counts = metrics.param_counts(cfg.model)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.seq_len
    flops = metrics.flops_per_token(cfg.model) * tokens  # PaLM appendix B: 6N + 12LHQT
    lines = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if "eval_loss" in r][-1]
    print(f"{run:<22}{counts['params']:>12,}{counts['non_embedding_params']:>12,}{tokens:>12,}"
          f"{flops:>10.2e}{last['eval_loss']:>11.4f}{last['eval_bpb']:>8.4f}")
PY
