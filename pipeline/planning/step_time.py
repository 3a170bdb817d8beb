"""The step-time model: how long one optimizer step takes on one GPU, as a central value and a range, for any dense
decoder (`decoder_step`) and for Janus's parts (report.py builds the same `StepWork` from them).

A step is `micro_batches` forwards and backwards, then the optimizer. Per micro-batch:

    compute      matmuls at the GPU's sustained GEMM rate (hardware.py) x MATMUL_IN_MODEL x the shape's efficiency
                 (a GEMM whose smallest dimension is d runs at d / (d + MATMUL_HALF_DIM) of the large-shape rate),
                 attention at FlashAttention's share of peak, memory-bound kernels (norms, residual adds, RoPE,
                 activations, softmax / cross-entropy) at HBM bandwidth x HBM_EFFICIENCY;
    communication  collectives.py's NCCL costs; it runs beside compute (prefetch, overlap_comm), which slows compute
                 by NCCL_CONTENTION for as long as both run (NCCL's kernels take SMs and HBM bandwidth), and what is
                 left over after compute is exposed;
plus, once a step: the first gather before the first forward and the last reduce-scatter after the last backward
(nothing to hide them under), step-boundary collectives (ZeRO-2's weight all-gather), the optimizer step (memory-bound,
OPTIMIZER_BYTES per trainable parameter of the GPU's shard), a checkpoint save amortised over `save_every` steps; and
the step is never quicker than the data loader delivers its tokens.

The range: the compute rate and the network both SPREAD lower and higher than central (SPREAD is the largest error
the calibration rows leave, tests/unit/test_predict.py); a measured step (--measured) replaces the compute rate and
narrows its part of the range to MEASURED_SPREAD.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.planning.collectives import Cluster, Collective
from pipeline.planning.hardware import HBM_EFFICIENCY

# Share of the GPU's best-shape GEMM rate that a training step's matmuls reach: backward GEMMs run on transposed
# layouts, tiles quantise on the last wave, the allocator and launches leave gaps. Fitted once, to the calibration
# rows (tests/unit/test_predict.py: torchtitan's and MosaicML's published runs), shared by every GPU and shape.
MATMUL_IN_MODEL = 0.80
# A GEMM whose smallest dimension is d reaches d / (d + 128) of the large-shape rate: ~97% at 4096, ~89% at 1024
# (the saturation of GEMM throughput with size in Anthony et al. 2024, "The Case for Co-Designing Model
# Architectures with Hardware", arXiv 2401.14489).
MATMUL_HALF_DIM = 128
# Compute slows by this share while a collective runs beside it: NCCL's kernels occupy SMs and HBM bandwidth
# (10-20% GEMM slowdowns under concurrent collectives are reported in the overlap literature: Rashidi et al., ISCA
# 2021; Pati et al., "T3", ASPLOS 2024); the low end, as FSDP and ZeRO overlap with few channels.
NCCL_CONTENTION = 0.10
# The range: +-15%, the largest error left on the calibration rows; a measured step knows its compute to +-5%.
SPREAD = 0.15
MEASURED_SPREAD = 0.05
# AdamW on one fp32 parameter: read master weight, gradient, m, v (4 B each), write master, m, v (4 B each) and the
# bf16 copy the next forward reads (2 B).
OPTIMIZER_BYTES = 30
# Per logit of a head's cross-entropy: the bf16 logits written and read (2 + 2), the fp32 log-softmax written and
# read (4 + 4), its gradient written in fp32 and read back as bf16 (4 + 4 + 2 + 2).
LOGIT_TRAFFIC_BYTES = 24
# A checkpoint is written at this rate per node: a parallel file system client's 2-10 GB/s, the low end (assumed,
# not measured here).
SAVE_BYTES_PER_S_PER_NODE = 2e9
# Bytes a checkpoint holds per parameter: bf16 weights (2) for every one, fp32 master weights + Adam m, v (12) per
# trainable one (DeepSpeed's layout).
SAVED_BYTES_ALL, SAVED_BYTES_TRAINABLE = 2, 12
ACT = 2  # bytes of a bf16 activation


@dataclass(frozen=True)
class LayerTraffic:
    """HBM bytes per token that one decoder layer's memory-bound kernels move, forward and backward."""

    forward: float
    backward: float


def layer_traffic(hidden: int, q_width: int, kv_width: int, ffn: int, mlp: str) -> LayerTraffic:
    """Two norms (forward: read + write D; backward: read input and gradient, write gradient), two residual adds (read
    two, write one, both ways), RoPE on q and k (read + write, both ways), the MLP's activation (SwiGLU: forward reads
    gate and up, writes their product; backward reads those three, writes two gradients; GELU: one in, one out
    forward, two in one out backward); bf16 throughout. Attention's own reads are in its kernel's efficiency."""
    d, rope = hidden, q_width + kv_width
    act_fwd, act_bwd = (3 * ffn, 5 * ffn) if mlp == "swiglu" else (2 * ffn, 3 * ffn)
    forward = ACT * (2 * 2 * d + 2 * 3 * d + 2 * rope + act_fwd)
    backward = ACT * (2 * 3 * d + 2 * 3 * d + 2 * rope + act_bwd)
    return LayerTraffic(forward, backward)


@dataclass(frozen=True)
class Matmuls:
    """Matmul FLOPs of one kind, and the smallest dimension of their weights (what their shape efficiency reads)."""

    flops: float
    width: int


@dataclass(frozen=True)
class MicroBatchWork:
    """What one GPU computes in one micro-batch (recompute included)."""

    matmuls: tuple[Matmuls, ...]
    attention_flops: float
    memory_bytes: float
    model_flops: float  # MFU's numerator: no recompute
    tokens: int


@dataclass(frozen=True)
class StepWork:
    """One optimizer step on one GPU: micro-batches, what each communicates, and what runs once."""

    micro_batch: MicroBatchWork
    micro_batches: int
    first: tuple[Collective, ...]      # the step's first micro-batch
    later: tuple[Collective, ...]      # each later one
    edges: tuple[Collective, ...]      # exposed: the first gather and the last reduce-scatter
    boundary: tuple[Collective, ...]   # after the last backward, not overlapped (ZeRO-2's weight all-gather)
    trainable_shard: float             # trainable parameters this GPU's optimizer steps
    saved_bytes: float                 # what this GPU writes to a checkpoint


@dataclass(frozen=True)
class Operations:
    """What a step shares with the rest of the run: saves, the data loader."""

    save_every: int | None = 1000             # steps between checkpoints (the training default); None: no saves
    loader_tokens_per_s: float | None = None  # one rank's data loader; None: never the bottleneck


TRAINING_RUN = Operations()


@dataclass(frozen=True)
class Rates:
    """The compute and network rates a step is costed at: central, or one end of the range."""

    matmul_efficiency: float = MATMUL_IN_MODEL  # share of the GPU's sustained GEMM rate
    bandwidth_scale: float = 1.0
    compute_scale: float = 1.0                  # attention and memory-bound work, with the matmuls' end of the range


@dataclass(frozen=True)
class StepTime:
    compute_s: float      # per step, with NCCL's contention
    comm_s: float         # per step, overlapped or not
    exposed_s: float      # communication no compute hides: overflow, step edges, boundary collectives
    optimizer_s: float
    save_s: float         # amortised per step
    loader_s: float       # the data loader's time for the step's tokens
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float


CENTRAL = Rates()


def shape_efficiency(width: int) -> float:
    return width / (width + MATMUL_HALF_DIM)


def compute_seconds(work: MicroBatchWork, cluster: Cluster, rates: Rates) -> float:
    """One micro-batch's kernels, back to back, with nothing else running."""
    gpu = cluster.gpu
    matmul = sum(m.flops / (gpu.matmul_flops * rates.matmul_efficiency * shape_efficiency(m.width))
                 for m in work.matmuls)
    attention = work.attention_flops / (gpu.peak_flops * gpu.attention_efficiency * rates.compute_scale)
    memory = work.memory_bytes / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY * rates.compute_scale)
    return matmul + attention + memory


def overlapped(compute: float, comm: float) -> tuple[float, float]:
    """(wall time, compute with contention) of a micro-batch whose collectives run beside its compute."""
    slowed = compute + NCCL_CONTENTION * min(compute, comm)
    return max(slowed, comm), slowed


def optimizer_seconds(trainable: float, cluster: Cluster) -> float:
    """AdamW over `trainable` fp32 parameters: memory-bound."""
    return trainable * OPTIMIZER_BYTES / (cluster.gpu.hbm_bytes_per_s * HBM_EFFICIENCY)


def save_seconds(work: StepWork, cluster: Cluster, ops: Operations) -> float:
    """One checkpoint's write (every GPU of a node sharing its file-system client), spread over the steps between."""
    if not ops.save_every:
        return 0.0
    return work.saved_bytes * cluster.gpus_per_node / SAVE_BYTES_PER_S_PER_NODE / ops.save_every


def step_time(work: StepWork, cluster: Cluster, ops: Operations, rates: Rates = CENTRAL) -> StepTime:
    """One step: the micro-batches with their overlapped collectives, then what runs once; never quicker than the
    data loader delivers the step's tokens (it runs ahead, in parallel)."""
    def comm(collectives: tuple[Collective, ...]) -> float:
        return sum(c.seconds(cluster, rates.bandwidth_scale) for c in collectives)

    compute = compute_seconds(work.micro_batch, cluster, rates)
    first, later = comm(work.first), comm(work.later)
    (wall_first, slowed_first), (wall_later, slowed_later) = overlapped(compute, first), overlapped(compute, later)
    rest = work.micro_batches - 1
    body, slowed = wall_first + rest * wall_later, slowed_first + rest * slowed_later
    once = comm(work.edges) + comm(work.boundary)
    optimizer, save = optimizer_seconds(work.trainable_shard, cluster), save_seconds(work, cluster, ops)
    tokens = work.micro_batch.tokens * work.micro_batches
    loader = tokens / ops.loader_tokens_per_s if ops.loader_tokens_per_s else 0.0
    step = max(body + once + optimizer + save, loader)
    return StepTime(compute_s=slowed, comm_s=first + rest * later + once, exposed_s=body - slowed + once,
                    optimizer_s=optimizer, save_s=save, loader_s=loader, step_s=step,
                    tokens_per_s_per_gpu=tokens / step,
                    mfu=work.micro_batch.model_flops * work.micro_batches / (step * cluster.gpu.peak_flops))


def measured_matmul_efficiency(work: MicroBatchWork, trainable: float, cluster: Cluster, seconds: float) -> float:
    """The share of the GPU's sustained GEMM rate at which the model's compute of one measured single-GPU step
    (forward, backward and an unsharded optimizer step; no communication) takes `seconds`: what the model left for
    the matmuls once attention, memory-bound work and the optimizer have theirs."""
    gpu = cluster.gpu
    full = compute_seconds(work, cluster, Rates(matmul_efficiency=1.0))
    matmul = sum(m.flops / (gpu.matmul_flops * shape_efficiency(m.width)) for m in work.matmuls)
    rest = full - matmul + optimizer_seconds(trainable, cluster)
    if seconds <= rest:
        raise ValueError(f"a measured step of {seconds:.3g} s is quicker than its attention, memory-bound work and "
                         f"optimizer alone ({rest:.3g} s): not this GPU, or not this step")
    return min(1.0, matmul / (seconds - rest))


@dataclass(frozen=True)
class Measured:
    """A measured step's compute rate on one GPU type (hardware.py's name) and matmul width: it replaces
    MATMUL_IN_MODEL there (measured.py reads it from bench/train_step.py's JSON)."""

    gpu: str
    width: int
    matmul_efficiency: float
    source: str


@dataclass(frozen=True)
class Prediction:
    """The central value and the range; `measured`: the compute rate was measured, not modelled."""

    low: StepTime
    mid: StepTime
    high: StepTime
    measured: bool = False

    def as_dict(self) -> dict:
        """The headline figures, each {"low", "mid", "high"}: the low end of tokens/s and MFU is the slow end, of step
        time the fast end; and which figures were measured, which modelled."""
        def ends(name: str) -> dict[str, float]:
            return {"low": getattr(self.low, name), "mid": getattr(self.mid, name), "high": getattr(self.high, name)}

        step = ends("step_s")
        return {"tokens_per_s_per_gpu": ends("tokens_per_s_per_gpu"), "mfu": ends("mfu"),
                "step_s": {"low": step["high"], "mid": step["mid"], "high": step["low"]},
                "measured": ["compute"] if self.measured else [],
                "modelled": ["communication", "overlap", "optimizer", "saves", "data loader"]
                + ([] if self.measured else ["compute"])}


def central_rates(cluster: Cluster, width: int, measured: Measured | None) -> tuple[Rates, float, bool]:
    """The central rates, the compute spread and whether they were measured: a measured step's for its GPU type and
    matmul width, else the calibrated ones."""
    if measured is not None and measured.gpu == cluster.gpu.name and measured.width == width:
        return Rates(matmul_efficiency=measured.matmul_efficiency), MEASURED_SPREAD, True
    return Rates(), SPREAD, False


def predict(work: StepWork, cluster: Cluster, ops: Operations, width: int,
            measured: Measured | None = None) -> Prediction:
    """The step costed at the central rates and at both ends of the range (compute and network each SPREAD off)."""
    rates, spread, is_measured = central_rates(cluster, width, measured)

    def end(sign: int) -> StepTime:
        scale = 1 + sign * spread
        return step_time(work, cluster, ops, replace(
            rates, matmul_efficiency=min(1.0, rates.matmul_efficiency * scale), compute_scale=scale,
            bandwidth_scale=1 + sign * SPREAD))

    return Prediction(low=end(-1), mid=step_time(work, cluster, ops, rates), high=end(+1), measured=is_measured)
