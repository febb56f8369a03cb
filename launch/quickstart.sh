#!/usr/bin/env bash
# Fresh machine -> venv -> trains configs/quickstart.yaml on the standard library on CPU -> samples.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/_venv.sh ""
RUN_DIR=${RUN_DIR:-runs/quickstart}
start=$(date +%s)
"$VENV/bin/gptjax" train configs/quickstart.yaml run_dir="$RUN_DIR" "$@"
echo "trained in $(( $(date +%s) - start )) s; sampling:"
echo "----------------------------------------"
"$VENV/bin/gptjax" sample "$RUN_DIR" --prompt "def " --max-new-tokens 200 --temperature 0.8 \
  --top-k 50
echo "----------------------------------------"
"$VENV/bin/gptjax" eval "$RUN_DIR"
cat <<EOF
----------------------------------------
gptjax is installed in $VENV: run $VENV/bin/gptjax, or activate the environment first:
  . $VENV/bin/activate
  gptjax sample $RUN_DIR --prompt "class "    # more text
  gptjax plot $RUN_DIR                        # its curves: $RUN_DIR/metrics.png
EOF
