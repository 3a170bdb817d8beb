# Sourced by the launchers/slurm/*.sbatch scripts (and by task.sh on every rank): what they share.
#
# How a rank is launched, and why this way: `srun` starts one task per GPU and each task turns Slurm's own
# variables into the torch.distributed ones (task.sh -> janus_rank_env):
#     RANK = SLURM_PROCID   LOCAL_RANK = SLURM_LOCALID   WORLD_SIZE = SLURM_NTASKS   NODE_RANK = SLURM_NODEID
#     MASTER_ADDR = the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"`
#     MASTER_PORT = 10000 + job id mod 20000 (below Linux's ephemeral range, and two jobs sharing a first node
#                   almost never collide)
# pipeline/train.py's deepspeed.init_distributed() reads exactly these. We do not use the deepspeed launcher:
# it reaches the other nodes through pdsh/ssh, which clusters rarely allow between compute nodes, and its
# processes live outside Slurm's job steps, so Slurm could neither signal them (pre-emption) nor clean them up.
# srun's tasks are Slurm's own: accounted, signalled, killed together (--kill-on-bad-exit).
#
# Knobs are environment variables read at run time (sbatch passes the submitting shell's environment), so
# `VAR=... sbatch ...` overrides any of them; Slurm's own (nodes, ranks per node, GPUs, partition, account,
# time) are `sbatch --nodes=... --ntasks-per-node=... --gpus-per-node=... -p ... -A ... -t ...` (or SBATCH_*).

# ---- where things are ---------------------------------------------------------------------------------------
# sbatch runs a copy of the script from Slurm's spool, so the repository is found from the submission
# directory (submit from the repository root) unless JANUS_REPO says otherwise.
JANUS_REPO="${JANUS_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ -x "$JANUS_REPO/.venv/bin/python" ]]; then PYTHON="${PYTHON:-$JANUS_REPO/.venv/bin/python}"; fi
PYTHON="${PYTHON:-python3}"
export JANUS_REPO PYTHON
export PYTHONPATH="$JANUS_REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1   # log lines reach logs/%x-%j.out as they happen

# ---- NCCL / torch.distributed: what a cluster admin expects to see set or settable ----------------------------
# Defaults only where a value is safe everywhere; the fabric-specific ones are the cluster's to set, and are
# passed through from the submitting environment (`NCCL_SOCKET_IFNAME=ib0 sbatch ...`) or a site profile:
#   NCCL_SOCKET_IFNAME   the interface for NCCL's bootstrap/socket traffic (e.g. ib0, eth0, ^lo,docker)
#   NCCL_IB_HCA          which InfiniBand HCAs/ports to use (e.g. mlx5_0:1,mlx5_1:1); unset = all
#   NCCL_IB_GID_INDEX    RoCE only (often 3)
#   NCCL_IB_TIMEOUT      IB verbs timeout exponent (NCCL default 20; raise on large, busy fabrics)
#   NCCL_IB_DISABLE=1    only to force TCP when there is no IB (slow: 32 x 8 A100 needs IB)
#   NCCL_NET_GDR_LEVEL   GPUDirect RDMA distance; NCCL's topology detection is usually right
#   NCCL_DEBUG=INFO      prints the rings/trees and chosen transports: the first thing to ask for on a hang
#   GLOO_SOCKET_IFNAME   the same as NCCL_SOCKET_IFNAME for gloo (CPU runs and some object collectives)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A failed or hung collective aborts the communicator and ends the process instead of hanging until the
# time limit (torch's watchdog; 1 = tear down), so srun --kill-on-bad-exit ends the step and the job.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# On a collective timeout, dump the flight recorder so the stuck rank and collective can be found.
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# One thread per rank for CPU ops: 8 ranks x all cores each would oversubscribe the node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Packed batches vary in length step to step: expandable segments keep the CUDA cache from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# ---- the node list and the rendezvous -----------------------------------------------------------------------
# scontrol expands Slurm's compressed node list (gpu[001-032]) into one host per line, in allocation order.
janus_hosts() {
    scontrol show hostnames "$SLURM_JOB_NODELIST"
}

janus_rendezvous() {
    local first
    first="$(janus_hosts | head -n 1)"
    export MASTER_ADDR="${MASTER_ADDR:-$first}"
    export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
}

# On every rank (task.sh): Slurm's per-task variables -> torch.distributed's.
janus_rank_env() {
    export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS" NODE_RANK="$SLURM_NODEID"
    export LOCAL_WORLD_SIZE="$JANUS_RANKS_PER_NODE"
}

# ---- launching one job step, with pre-emption handled -------------------------------------------------------
# Ranks per node (one per GPU) and CPUs per rank come from the allocation unless overridden.
janus_step_layout() {
    JANUS_RANKS_PER_NODE="${RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}"
    JANUS_RANKS_PER_NODE="${JANUS_RANKS_PER_NODE%%(*}"   # "8(x32)" -> 8
    local cpus="${SLURM_CPUS_ON_NODE:-$JANUS_RANKS_PER_NODE}"
    CPUS_PER_TASK="${CPUS_PER_TASK:-$((cpus / JANUS_RANKS_PER_NODE > 0 ? cpus / JANUS_RANKS_PER_NODE : 1))}"
    export JANUS_RANKS_PER_NODE CPUS_PER_TASK
    SRUN_ARGS=(
        --nodes="$SLURM_JOB_NUM_NODES"
        --ntasks-per-node="$JANUS_RANKS_PER_NODE"
        --ntasks="$((SLURM_JOB_NUM_NODES * JANUS_RANKS_PER_NODE))"
        # Set explicitly: since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task.
        --cpus-per-task="$CPUS_PER_TASK"
        --distribution=block    # ranks 0..7 on the first node, 8..15 on the second, ...: what render() assumes
        --kill-on-bad-exit=1    # one rank failing ends the step instead of leaving the others in a collective
        --label                 # every output line starts with its rank
    )
    # Extra srun flags for a site (e.g. --mpi=pmix, --container-image=...), split on spaces.
    local -a site_args
    read -r -a site_args <<<"${EXTRA_SRUN_ARGS:-}"
    SRUN_ARGS+=("${site_args[@]}")
}

# The launch a made-up allocation would get, one line per rank, without srun: for the render test and for a
# reader checking a layout before queueing 256 GPUs. It lays ranks out as srun --distribution=block does.
janus_render() {
    local hosts node=0 host local_id
    mapfile -t hosts < <(janus_hosts)
    for host in "${hosts[@]}"; do
        for ((local_id = 0; local_id < JANUS_RANKS_PER_NODE; local_id++)); do
            (
                SLURM_PROCID=$((node * JANUS_RANKS_PER_NODE + local_id)) SLURM_LOCALID=$local_id
                SLURM_NODEID=$node SLURM_NTASKS=$((${#hosts[@]} * JANUS_RANKS_PER_NODE))
                janus_rank_env
                echo "host=$host RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE NODE_RANK=$NODE_RANK" \
                     "LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" \
                     "CMD=$*"
            )
        done
        node=$((node + 1))
    done
}

# After the step, the batch script decides whether the job comes back (janus_after_step), and says why in the log:
#   - every rank finished (status 0, no USR1): done.
#   - a rank exited 2, a config or data error (pipeline/train.py: a bad flag, a missing or damaged shard or
#     checkpoint): the run's own fault, never requeued; the job ends FAILED with exit code 2.
#   - any other failure (a rank died or was killed, a hung rank's peers hit --collective-timeout-seconds, the
#     watchdog's exit 3): not the run's fault; requeued, and --resume auto continues from the newest intact
#     checkpoint. MAX_RESTARTS (default 100) bounds SLURM_RESTART_COUNT, which counts every requeue of the job,
#     pre-emptions too, so a run that crashes the same way each time stops after that many starts.
# srun's status cannot tell these apart: with --kill-on-bad-exit, a rank still starting when another refused
# is killed by the step's SIGTERM/SIGKILL, and srun reports that signal (143, 137) instead of the refusal's 2
# (seen on Slurm 22.05: one task exits 2, the other is killed -> srun returns 137). So task.sh writes a file
# per rank that exits 2 into JANUS_REFUSED_DIR before srun can learn of the exit; the batch script reads it.
# It must be on a file system every node sees: by default logs/.refused-JOBID under the submission directory
# (the repository root, shared); a knob for a site whose submission directory is not.
#
# Pre-emption and time limits. `#SBATCH --signal=B:USR1@N` sends USR1 to this batch shell only, N seconds
# before the end; the trap forwards it to every task of the running step (`scancel --signal` without --batch
# signals the job's steps, not the batch shell). pipeline/train.py checkpoints within two steps on
# USR1 (any rank) and exits 0; then we requeue (`--requeue` alone covers node failures and pre-emption, not
# a TIMEOUT) and the requeued job continues with --resume auto. SIGTERM (scancel, or a pre-emption with
# PreemptMode=REQUEUE, where Slurm requeues by itself) reaches the tasks from Slurm directly: training
# checkpoints if KillWait/GraceTime allow, and we only wait for it, never requeue.
janus_stop=""
_janus_on_usr1() {
    janus_stop=usr1
    echo "[slurm] $(date -Is) USR1: asking the ranks to checkpoint and exit" >&2
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
_janus_on_term() {
    janus_stop=${janus_stop:-term}
    echo "[slurm] $(date -Is) TERM: Slurm is ending this run of the job; the ranks checkpoint if they can" >&2
}

# The ranks that recorded an exit 2 (task.sh), comma-separated; empty if none.
janus_refused_ranks() {
    local f ranks=()
    for f in "$JANUS_REFUSED_DIR"/rank-*; do
        [[ -e "$f" ]] && ranks+=("${f##*/rank-}")
    done
    ((${#ranks[@]})) && printf '%s\n' "${ranks[@]}" | sort -n | paste -sd, -
    return 0
}

# Only the files task.sh writes are removed: the directory may be a user's JANUS_REFUSED_DIR.
janus_clear_refusals() {
    rm -f "$JANUS_REFUSED_DIR"/rank-*
    rmdir "$JANUS_REFUSED_DIR" 2>/dev/null || true
}

# janus_after_step STATUS: requeue the job or not, saying why; returns the job's exit status.
janus_after_step() {
    local rc="$1" restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_RESTARTS:-100}" refused why
    refused="$(janus_refused_ranks)"
    janus_clear_refusals
    if [[ -n "$refused" ]]; then
        echo "[slurm] rank(s) $refused exited 2: a config or data error (the run's own, see its error: line)," \
             "not requeueing (restart $restarts; srun reported $rc)" >&2
        return 2
    fi
    if [[ "$janus_stop" == term ]]; then
        echo "[slurm] step exited $rc after SIGTERM: Slurm is ending or requeueing the job itself," \
             "not requeueing (restart $restarts)" >&2
        return "$rc"
    fi
    if [[ "$janus_stop" == usr1 && $rc -eq 0 ]]; then
        why="checkpointed after USR1 (time limit or pre-emption)"
    elif ((rc != 0)); then
        why="step failed with status $rc and no rank refused its inputs (a rank died or hung, or a node failed)"
    else
        echo "[slurm] every rank finished: done (restart $restarts)" >&2
        return 0
    fi
    if ((restarts >= max)); then
        echo "[slurm] $why; restarted $restarts times already (MAX_RESTARTS=$max): not requeueing" >&2
        return "$rc"
    fi
    echo "[slurm] $(date -Is) $why: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)" >&2
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60 # Slurm ends this run of the job now; the requeued one resumes from the newest intact checkpoint
    return "$rc"
}

# janus_launch COMMAND...: one task per rank through task.sh, then requeue or not (janus_after_step).
janus_launch() {
    if [[ -n "${JANUS_RENDER:-}" ]]; then
        janus_render "$@"
        return 0
    fi
    echo "[slurm] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NUM_NODES node(s):" \
         "$((SLURM_JOB_NUM_NODES * JANUS_RANKS_PER_NODE)) ranks, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
    # Per job, emptied at each start: a requeued job keeps its id, and an old refusal must not stop it.
    export JANUS_REFUSED_DIR="${JANUS_REFUSED_DIR:-${SLURM_SUBMIT_DIR:-$JANUS_REPO}/logs/.refused-$SLURM_JOB_ID}"
    janus_clear_refusals
    mkdir -p "$JANUS_REFUSED_DIR"
    trap _janus_on_usr1 USR1
    trap _janus_on_term TERM
    srun "${SRUN_ARGS[@]}" bash "$JANUS_REPO/launchers/slurm/task.sh" "$@" &
    local pid=$! rc=0 again
    [[ "$janus_stop" == usr1 ]] && _janus_on_usr1   # the signal came before the step existed
    set +e
    while :; do
        wait "$pid"
        rc=$?
        # A status above 128 may only mean a trapped signal interrupted `wait`: keep waiting for the step.
        if ((rc > 128)); then
            if kill -0 "$pid" 2>/dev/null; then continue; fi
            wait "$pid"
            again=$?
            ((again != 127)) && rc=$again
        fi
        break
    done
    echo "[slurm] $(date -Is) step exited $rc" >&2
    janus_after_step "$rc"
    rc=$?
    set -e
    return "$rc"
}

# ---- training (stage{1,2,3}.sbatch) -------------------------------------------------------------------------
# janus_train STAGE DEFAULT_INIT: the knob groups, Megatron-style, joined into one command at the end.
janus_train() {
    local stage="$1" default_init="${2:-}"
    : "${DATA:?set DATA to the manifest directories to train on (space-separated), e.g. DATA=\"shards/und shards/gen\"}"
    local -a data extra
    read -r -a data <<<"$DATA"
    read -r -a extra <<<"${EXTRA_ARGS:-}"
    local init="${INIT-$default_init}"
    janus_rendezvous
    janus_step_layout

    MODEL_ARGS=()   # unset MODEL: the model --init holds (a previous stage's run, or released weights)
    [[ -n "${MODEL:-}" ]] && MODEL_ARGS+=(--model "$MODEL")
    [[ -n "$init" ]] && MODEL_ARGS+=(--init "$init")
    [[ -n "${TOKENIZER:-}" ]] && MODEL_ARGS+=(--tokenizer "$TOKENIZER")
    DATA_ARGS=(--data "${data[@]}")
    # Table 2 comes from model/stages.py; a YAML file (CONFIG) or EXTRA_ARGS overrides any of it.
    TRAINING_ARGS=(--gpus-per-node "$JANUS_RANKS_PER_NODE")
    [[ -n "${CONFIG:-}" ]] && TRAINING_ARGS+=(--config "$CONFIG")
    CHECKPOINT_ARGS=(--output "${OUTPUT:-runs/stage$stage}" --resume auto --save-every "${SAVE_EVERY:-1000}")

    cd "$JANUS_REPO"
    janus_launch "$PYTHON" "launchers/stage$stage.py" \
        "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${extra[@]}"
}
