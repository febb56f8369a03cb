#!/usr/bin/env bash
# GPU throughput in one go: `gptjax bench` for GPT-2 124M (configs/gpt2_small.yaml) and GPT-2 350M
# (configs/gpt2_medium.yaml), bf16 compute, cuDNN flash attention, synthetic batches, batch sizes
# tried upward until one does not fit (one JSON line per batch size; the failing one says
# "error": "out_of_memory"). Then GPT-2 124M at its largest batch with the chunked
# cross-entropy, if time allows. About 5 minutes on one H100/H200; every command has a timeout and
# the whole script stops starting new ones after BUDGET_S seconds.
#
#   ./launch/bench_gpu.sh                       # needs jax with CUDA (pip install 'jax[cuda12]')
#   SMALL_BATCHES="32 64" STEPS=10 ./launch/bench_gpu.sh
#   OUT=bench.jsonl ./launch/bench_gpu.sh       # also append the JSON lines to a file
#
# Without a GPU it prints why and exits 0 (nothing to measure).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-15}
WARMUP=${WARMUP:-5}
SMALL_BATCHES=${SMALL_BATCHES:-"16 32 64 128"}    # global batch, sequences of 1024 tokens
MEDIUM_BATCHES=${MEDIUM_BATCHES:-"16 32 64"}
BUDGET_S=${BUDGET_S:-480}        # start nothing new after this many seconds
PER_RUN_S=${PER_RUN_S:-240}      # timeout of one model's batch sweep
OUT=${OUT:-/dev/null}
ATTENTION=${ATTENTION:-cudnn}
EXTRA=${EXTRA:-}                 # more key=value overrides for every run
# Let the allocator use nearly all of the GPU, so "largest batch that fits" means it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

if [[ -z "${ALLOW_CPU:-}" ]] &&  # ALLOW_CPU=1: check this script's plumbing on a CPU
   ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "bench_gpu.sh: JAX sees no GPU (backend: $("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo 'jax missing')); nothing to measure" >&2
  exit 0
fi
"$PYTHON" -c 'import jax; print("devices:", jax.devices())' >&2

sweep() {  # sweep CONFIG "BATCHES" [overrides...]: prints the JSON lines, returns the largest fit
  local config=$1 batches=$2; shift 2
  if (( SECONDS > BUDGET_S )); then
    echo "bench_gpu.sh: skipping $config $* (over the ${BUDGET_S}s budget)" >&2
    return 1
  fi
  timeout "$PER_RUN_S" "$PYTHON" -m gptjax bench "$config" \
    model.dtype=bfloat16 model.attention="$ATTENTION" train.micro_batches=1 $EXTRA "$@" \
    --batch-sizes "$(echo "$batches" | tr ' ' ',')" --steps "$STEPS" --warmup "$WARMUP" \
    | tee -a "$OUT"
  local rc=${PIPESTATUS[0]}
  if (( rc == 124 )); then
    echo "bench_gpu.sh: $config timed out after ${PER_RUN_S}s" >&2
  fi
  return "$rc"
}

largest_fit() {  # the largest batch_size among the successful JSON lines on stdin
  "$PYTHON" -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
fits = [r["batch_size"] for r in rows if "error" not in r]
print(max(fits) if fits else "")'
}

small=$(sweep configs/gpt2_small.yaml "$SMALL_BATCHES")
echo "$small"
sweep configs/gpt2_medium.yaml "$MEDIUM_BATCHES"
best=$(echo "$small" | largest_fit)
if [[ -n "$best" ]]; then
  sweep configs/gpt2_small.yaml "$best" model.loss_chunk=256
fi
echo "bench_gpu.sh: done in ${SECONDS}s" >&2
