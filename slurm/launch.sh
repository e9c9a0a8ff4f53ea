#!/usr/bin/env bash
# The one launcher behind slurm/*.sbatch:  launch.sh <job> <config.yaml> [key=value ...]
# 1. plan (Python, src/hpcnlp/runtime/launch.py): rendezvous, container wrapping, the srun line;
# 2. check the config again, in the environment the job runs in; refuse (exit 2) before any step;
# 3. one srun task per node (torchrun | accelerate launch inside), --kill-on-bad-exit=1;
# 4. on Slurm's warning signal (USR1) ask the ranks to checkpoint (launchers swallow USR1, so the
#    request goes through a flag file every rank polls), then requeue the job when they did.
# A plain scancel still cancels: SIGTERM is not trapped here.
set -uo pipefail
job=$1; shift
HPCNLP_HOME=${HPCNLP_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# The planner is standard library only: a bare python3 will do when the stack lives in an image.
# Bare runs use the planner's interpreter on every node (the checkout's .venv when there is one).
planner=${HPCNLP_PYTHON:-python3}
[ -z "${HPCNLP_PYTHON:-}" ] && [ -x "$HPCNLP_HOME/.venv/bin/python" ] && planner=$HPCNLP_HOME/.venv/bin/python

state_dir=${HPCNLP_STATE_DIR:-$SLURM_SUBMIT_DIR/outputs/.slurm}
mkdir -p "$state_dir"
export HPCNLP_PREEMPT_FILE=$state_dir/preempt-$SLURM_JOB_ID
rm -f "$HPCNLP_PREEMPT_FILE"

plan=$(PYTHONPATH=$HPCNLP_HOME/src${PYTHONPATH:+:$PYTHONPATH} "$planner" -m hpcnlp.runtime.launch plan "$job" --config "$@") || exit 2
eval "$plan"
echo "launch: $(date +%T) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s): $DESCRIBE"
"${CHECK[@]}" || { echo "launch: config refused; nothing started" >&2; exit 2; }

preempted=0
on_usr1() { preempted=1; echo "launch: $(date +%T) USR1: asking every rank to checkpoint and stop"; touch "$HPCNLP_PREEMPT_FILE"; }
trap on_usr1 USR1
"${CMD[@]}" &
step=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the step is really done.
while :; do wait "$step"; rc=$?; kill -0 "$step" 2>/dev/null || break; done
rm -f "$HPCNLP_PREEMPT_FILE"
if [ "$preempted" = 1 ] && [ "$rc" != 0 ]; then
  echo "launch: $(date +%T) checkpointed (step exit $rc); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
echo "launch: $(date +%T) step finished with exit $rc"
exit "$rc"
