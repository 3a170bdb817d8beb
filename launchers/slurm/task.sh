#!/usr/bin/env bash
# One rank: srun starts this once per task; it turns Slurm's task variables into torch.distributed's
# (common.sh: janus_rank_env), runs the rank and, if it exits 2 (a config or data error), says so in
# JANUS_REFUSED_DIR before srun can learn of the exit: srun's own status may report another rank's kill
# instead (common.sh: janus_after_step).
set -euo pipefail
# Slurm signals every process of the step, this shell too: a trap (unlike an ignored signal, not inherited)
# keeps it alive to record the status while the rank handles USR1/TERM itself (checkpoint, then exit).
trap : USR1 TERM
# shellcheck source=launchers/slurm/common.sh
source "$JANUS_REPO/launchers/slurm/common.sh"
janus_rank_env
rc=0
"$@" || rc=$?
if ((rc == 2)) && [[ -n "${JANUS_REFUSED_DIR:-}" ]]; then
    echo "rank $RANK exited 2" >"$JANUS_REFUSED_DIR/rank-$RANK" ||
        echo "task.sh: cannot record rank $RANK's exit 2 in $JANUS_REFUSED_DIR (not shared by every node?)" >&2
fi
exit "$rc"
