#!/usr/bin/env bash
# One rank: srun starts this once per task; it turns Slurm's task variables into torch.distributed's
# (common.sh: janus_rank_env) and becomes the training process, so Slurm's signals reach Python directly.
set -euo pipefail
# shellcheck source=launchers/slurm/common.sh
source "$JANUS_REPO/launchers/slurm/common.sh"
janus_rank_env
exec "$@"
