#!/usr/bin/env bash
# launch/slurm.sbatch on a real single-node SLURM (what .ci/run calls after the test suite).
#
# Installs Debian's slurmctld/slurmd/slurm-client and munge when they are missing (as root,
# apt-get), starts munged and a private slurmctld + slurmd for this machine (config, state and
# logs in a temporary directory, free ports; the system's own SLURM, if any, is left alone),
# then, on configs/debug.yaml with mesh (2,2,2):
#   1. one process with 8 CPU devices trains STEPS steps: the reference;
#   2. the template, 2 tasks x 4 CPU devices, is stopped by SIGTERM to its tasks after a few
#      steps (what `#SBATCH --signal=TERM@120` delivers before a time limit): the job must end
#      COMPLETED with a checkpoint;
#   3. the same sbatch command resumes it to STEPS: every step's loss must match the reference;
#   4. a missing GPTJAX_VENV must fail the job with one clear line.
# Where SLURM cannot be installed or started it says why and exits 0 (skipped).
# Usage: launch/ci_slurm.sh   (after ./launch/test.sh has made the venv; GPTJAX_VENV to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STEPS=${GPTJAX_CI_SLURM_STEPS:-20}
WAIT=${GPTJAX_CI_SLURM_TIMEOUT:-420}  # seconds for each job

say() { echo "ci_slurm: [${SECONDS}s] $*" >&2; }
skip() {
  say "SKIPPED: $*"
  exit 0
}
fail() {
  say "FAILED: $*"
  KEEP=1
  exit 1
}

VENV=$(realpath -m "${GPTJAX_VENV:-.venv}")
[ -x "$VENV/bin/python" ] || skip "no virtual environment at $VENV (run ./launch/test.sh first)"
PYTHON=$VENV/bin/python

# --- install ----------------------------------------------------------------------------------
PACKAGES=(slurmctld slurmd slurm-client munge)
have_slurm() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null
if ! have_slurm; then
  [ "$(id -u)" = 0 ] || skip "SLURM is not installed and installing it needs root"
  command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get"
  say "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  install() { timeout 900 apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; }
  if ! install >/tmp/gptjax-ci-apt.log 2>&1; then
    timeout 300 apt-get update -q >>/tmp/gptjax-ci-apt.log 2>&1 || true
    install >>/tmp/gptjax-ci-apt.log 2>&1 ||
      skip "apt-get could not install ${PACKAGES[*]}: $(tail -1 /tmp/gptjax-ci-apt.log)"
  fi
  have_slurm || skip "installed, but slurmctld/slurmd/sbatch/munged are still not on PATH"
fi

WORK=$(mktemp -d /tmp/gptjax-slurm.XXXXXX)
STARTED=()  # pid files of the daemons this script started, stopped on exit
KEEP=  # set on failure: keep $WORK (logs, job output) for a look
cleanup() {
  [ -n "${SLURM_CONF:-}" ] && scancel --full --quiet --partition=ci 2>/dev/null || true
  for pidfile in "${STARTED[@]}"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  if [ -z "$KEEP" ]; then rm -rf "$WORK"; else say "kept $WORK"; fi
}
trap cleanup EXIT

# --- munge --------------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || skip "munged is not running and starting it needs root"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 600 /etc/munge/munge.key
  if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
    runuser -u munge -- munged || skip "munged did not start"
  else
    munged --force || skip "munged did not start"
  fi
  STARTED+=(/run/munge/munged.pid)
  munge -n | unmunge >/dev/null 2>&1 || skip "munge does not work after starting munged"
fi

# --- a private SLURM for this one node -------------------------------------------------------
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
NODE_LINE=$(slurmd -C 2>/dev/null | head -1)  # NodeName=host CPUs=.. ... RealMemory=..
case "$NODE_LINE" in NodeName=*) ;; *) skip "slurmd -C did not describe this node" ;; esac
HOST=${NODE_LINE#NodeName=}
HOST=${HOST%% *}
mkdir -p "$WORK/state" "$WORK/spool" "$WORK/log"
export SLURM_CONF=$WORK/slurm.conf
cat >"$SLURM_CONF" <<EOF
ClusterName=gptjaxci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=30
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
logs() { tail -n 20 "$WORK"/log/*.log >&2 || true; }
slurmctld || { logs; skip "slurmctld did not start"; }
STARTED+=("$WORK/slurmctld.pid")
slurmd || { logs; skip "slurmd did not start"; }
STARTED+=("$WORK/slurmd.pid")
for _ in $(seq 60); do
  [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
  sleep 1
done
[ "$(sinfo -h -o %T 2>/dev/null)" = idle ] || { logs; skip "the node did not become idle: $(sinfo 2>&1)"; }
say "SLURM $(sinfo -V | cut -d' ' -f2) up: $NODE_LINE ($WORK)"

# --- jobs -------------------------------------------------------------------------------------
CACHE=$WORK/cache
COMMON=(configs/debug.yaml "data.cache_dir=$CACHE" mesh.data=2 mesh.fsdp=2 mesh.tensor=2
  "train.steps=$STEPS" train.log_every=1 train.eval_every=0 checkpoint.every=0)
export GPTJAX_HOME=$ROOT GPTJAX_VENV=$VENV

state_of() { scontrol -o show job "$1" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_for() {  # JOB: until it leaves the queue; prints its final state
  local deadline=$((SECONDS + WAIT)) state
  while :; do
    state=$(state_of "$1")
    case "$state" in PENDING | RUNNING | CONFIGURING | COMPLETING | SUSPENDED | "") ;; *) break ;; esac
    if ((SECONDS > deadline)); then
      scancel "$1" || true
      state="still-$state-after-${WAIT}s"
      break
    fi
    sleep 1
  done
  echo "$state"
}
submit() {  # RUN_DIR [sbatch env VAR=VALUE ...]: prints the job id
  local run_dir=$1
  shift
  env "$@" GPTJAX_CPU_DEVICES_PER_TASK=4 sbatch --parsable --nodes=1 --ntasks-per-node=2 \
    --time=15 --output="$WORK/job-%j.out" launch/slurm.sbatch "${COMMON[@]}" "run_dir=$run_dir"
}
steps_logged() {
  local n
  n=$(grep -c '"loss"' "$1/metrics.jsonl" 2>/dev/null) || true
  echo "${n:-0}"
}

say "1/4 reference: one process, 8 CPU devices, $STEPS steps"
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  "$PYTHON" -m gptjax train "${COMMON[@]}" "run_dir=$WORK/single" --no-progress \
  >"$WORK/single.out" 2>"$WORK/single.err" || fail "the reference run failed: $(tail -3 "$WORK/single.err")"

say "2/4 sbatch launch/slurm.sbatch, 2 tasks x 4 CPU devices; SIGTERM to the tasks after step 3"
RUN=$WORK/slurm
JOB=$(submit "$RUN")
deadline=$((SECONDS + WAIT))
until (($(steps_logged "$RUN") >= 3)); do
  case "$(state_of "$JOB")" in PENDING | RUNNING | CONFIGURING) ;; *) break ;; esac
  ((SECONDS < deadline)) || break
  sleep 0.2
done
scancel --signal=TERM "$JOB"  # to every task, as --signal=TERM@N does (not the batch shell)
STATE=$(wait_for "$JOB")
OUT=$WORK/job-$JOB.out
[ "$STATE" = COMPLETED ] || fail "job $JOB ended $STATE, not COMPLETED: $(tail -20 "$OUT")"
STOPPED=$(sed -n 's/.*gptjax: stopped at step \([0-9]*\); checkpoint saved.*/\1/p' "$OUT" | head -1)
[ -n "$STOPPED" ] || fail "job $JOB did not stop with a checkpoint: $(tail -20 "$OUT")"
((STOPPED < STEPS)) || fail "job $JOB finished all $STEPS steps before the signal arrived"
[ -d "$RUN/checkpoints/$STOPPED" ] || fail "no checkpoint $RUN/checkpoints/$STOPPED"
say "   job $JOB: SIGTERM, stopped at step $STOPPED with a checkpoint, state $STATE"

say "3/4 the same sbatch command resumes it to step $STEPS"
JOB=$(submit "$RUN")
STATE=$(wait_for "$JOB")
OUT=$WORK/job-$JOB.out
[ "$STATE" = COMPLETED ] || fail "job $JOB ended $STATE: $(tail -20 "$OUT")"
grep -q "gptjax: resumed $RUN at step $STOPPED" "$OUT" || fail "job $JOB did not resume: $(tail -20 "$OUT")"
# Same mesh, 2 processes instead of 1: only the order of f32 sums may differ (as in
# tests/test_distributed.py::test_two_processes_train_like_one, rel 1e-5).
"$PYTHON" - "$WORK/single" "$RUN" "$STEPS" <<'EOF' || fail "losses differ from the reference"
import json, sys
from pathlib import Path

def losses(run):
    out = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed step's last line wins
    return out

ref, got, steps = losses(sys.argv[1]), losses(sys.argv[2]), int(sys.argv[3])
assert sorted(ref) == sorted(got) == list(range(1, steps + 1)), (sorted(ref), sorted(got))
worst = max(abs(got[s] / ref[s] - 1) for s in ref)
print(f"ci_slurm:    steps 1-{steps}: largest relative loss difference {worst:.1e}", file=sys.stderr)
assert worst <= 1e-5, worst
EOF

say "4/4 a missing GPTJAX_VENV is one clear error"
JOB=$(submit "$WORK/nothing" GPTJAX_VENV="$WORK/no-venv")
STATE=$(wait_for "$JOB")
OUT=$WORK/job-$JOB.out
[ "$STATE" = FAILED ] || fail "job $JOB with no venv ended $STATE"
grep -q "gptjax: error: no Python with gptjax and jax at $WORK/no-venv/bin/python" "$OUT" ||
  fail "job $JOB with no venv: $(cat "$OUT")"
say "passed"
