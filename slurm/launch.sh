#!/usr/bin/env bash
# The one launcher behind slurm/*.sbatch:  launch.sh <job> <config.yaml> [key=value ...]
# 1. plan (Python, src/hpcnlp/runtime/launch.py): rendezvous, container wrapping, the srun line;
# 2. check the config again, in the environment the job runs in; refuse (exit 2) before any step;
# 3. one srun task per node (torchrun | accelerate launch inside), --kill-on-bad-exit=1;
# 4. on Slurm's warning signal (USR1) ask the ranks to checkpoint (launchers swallow USR1, so the
#    request goes through a flag file every rank polls);
# 5. exit with the code rank 0 wrote in the outcome file (whatever torchrun made of the ranks' codes),
#    and requeue only when it says a checkpoint of this job was saved and max_requeues allows it.
#    Codes: 0 finished, 1 failed, 2 config refused, 3 rejected, 4 stalled, 5 launch failed (scontrol,
#    no free port, module load: nothing started), 75 checkpointed (docs/slurm.md).
# A plain scancel still cancels: SIGTERM is not trapped here.
set -uo pipefail
job=$1; shift
HPCNLP_HOME=${HPCNLP_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# The planner is standard library only: a bare python3 will do when the stack lives in an image.
# Bare runs use the planner's interpreter on every node (the checkout's .venv when there is one).
planner=${HPCNLP_PYTHON:-python3}
[ -z "${HPCNLP_PYTHON:-}" ] && [ -x "$HPCNLP_HOME/.venv/bin/python" ] && planner=$HPCNLP_HOME/.venv/bin/python

# Modules the cluster profile names (HPCNLP_MODULES), loaded before anything runs.
if [ -n "${HPCNLP_MODULES:-}" ]; then
  type module >/dev/null 2>&1 || source /etc/profile.d/modules.sh 2>/dev/null || source /etc/profile.d/lmod.sh 2>/dev/null
  # shellcheck disable=SC2086
  module load $HPCNLP_MODULES || { echo "launch: module load $HPCNLP_MODULES failed; nothing started" >&2; exit 5; }
fi
# This job's log (sbatch --output, expanded by Slurm): the job links it into its output_dir at the end.
HPCNLP_LOG=$(scontrol show job --oneliner "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)
export HPCNLP_LOG

state_dir=${HPCNLP_STATE_DIR:-$SLURM_SUBMIT_DIR/outputs/.slurm}
mkdir -p "$state_dir"
export HPCNLP_PREEMPT_FILE=$state_dir/preempt-$SLURM_JOB_ID
export HPCNLP_OUTCOME_FILE=$state_dir/outcome-$SLURM_JOB_ID
rm -f "$HPCNLP_PREEMPT_FILE" "$HPCNLP_OUTCOME_FILE"

plan=$(PYTHONPATH=$HPCNLP_HOME/src${PYTHONPATH:+:$PYTHONPATH} "$planner" -m hpcnlp.cluster.launcher plan "$job" --config "$@") || {
  echo "launch: the launcher could not plan the step; nothing started" >&2; exit 5; }
eval "$plan"
echo "launch: $(date +%T) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s): $DESCRIBE"
"${CHECK[@]}" || { echo "launch: config refused; nothing started" >&2; exit 2; }

on_usr1() { echo "launch: $(date +%T) USR1: asking every rank to checkpoint and stop"; touch "$HPCNLP_PREEMPT_FILE"; }
trap on_usr1 USR1
"${CMD[@]}" &
step=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the step is really done.
while :; do wait "$step"; rc=$?; kill -0 "$step" 2>/dev/null || break; done
rm -f "$HPCNLP_PREEMPT_FILE"
code=$(( rc == 0 ? 0 : 1 )); next=stop; why="the step ended without an outcome from rank 0 (step exit $rc)"
[ -s "$HPCNLP_OUTCOME_FILE" ] && read -r code next why < "$HPCNLP_OUTCOME_FILE"
rm -f "$HPCNLP_OUTCOME_FILE"
if [ "$next" = requeue ]; then
  echo "launch: $(date +%T) preempted: $why; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "launch: scontrol requeue failed"
fi
echo "launch: $(date +%T) exit $code: $why"
exit "$code"
