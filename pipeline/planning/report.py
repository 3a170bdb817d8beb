"""`--dry-run`'s performance plan: per step FLOPs, bytes per collective, step time, MFU and days, per sharding choice.

Read from deepspeed 0.19.8's `deepspeed.runtime.zero` (partition_parameters, partitioned_param_coordinator, stage3)
and `deepspeed.runtime.comm.coalesced_collectives`, what ZeRO-3 communicates per micro-batch:

- forward: one all-gather (`all_gather_into_tensor`) per module with parameters, of that module's parameters
  not marked persistent (numel <= stage3_param_persistence_threshold: gathered once after each optimizer step);
- backward: the same again for every module whose backward runs (it trains, or a gradient flows through it),
  except parameters still held: when a module is released, every parameter that reappears within the next
  `stage3_max_reuse_distance` elements of the recorded trace is kept, and so is one whose later use the
  prefetcher has already read past (see `gathered_elements`), so the last layers of the forward are not gathered
  again at the turn into the backward;
- gradients: every trainable parameter's gradient is reduce-scattered (`reduce_scatter_tensor`) in each
  micro-batch's backward, in `communication_data_type` (the parameters' dtype unless set).

hpZ (`zero_hpz_partition_size` = GPUs per node) keeps a second bf16 partition inside the node: a parameter's
first gather after an optimizer step crosses the nodes, every later one stays in the node. Trainable parameters'
secondary copies are dropped at each step (`invalidate_secondary_tensor` walks the fp16 groups only), frozen ones
are kept, so a frozen module crosses the nodes once per run. MiCS was removed in deepspeed 0.19.8 (its config
keys raise): it is costed for comparison and never recommended. ZeRO-2 keeps every weight whole: it all-reduces
gradients every micro-batch, not a reduce-scatter (`use_multi_rank_bucket_allreduce`, on by default, sends each
bucket whole through `allreduce_and_scatter` and each rank keeps its part: twice a reduce-scatter's bytes; the
comms logger sees `all_reduce`), and all-gathers the updated trainable weights once per step.

`--frozen-weights persisted` (pipeline/engine.py's `persist_frozen`) marks ZeRO-3's frozen parameters `ds_persist`:
the coordinator never releases them once its trace is recorded, but the optimizer step partitions every parameter,
so a frozen module is gathered once per step, in its first micro-batch, and never in a backward; under hpZ that
gather stays in the node. It costs their whole bf16 weights on every GPU.

Cost model (assumptions, printed with the table and in the README):
- a collective over a group of g GPUs moves (g - 1) / g of its full size per GPU for an all-gather or a
  reduce-scatter, twice that for an all-reduce (NCCL rings); a group spanning nodes runs at the per-GPU
  inter-node bandwidth, a group inside a node at the intra-node one; plus (g - 1) hops of latency each;
- compute runs at `MATMUL_EFFICIENCY` of the GPU's bf16 peak on the hardware FLOPs (model FLOPs from
  pipeline/metrics.py plus checkpointing's recompute);
- compute and parameter/gradient communication overlap fully (prefetch and overlap_comm): a micro-batch takes
  max(compute, communication); what runs at the step boundary (ZeRO-2's weight all-gather) adds to it;
- rows are packed full with typical samples of the stage's ratio (pipeline/memory.py's TYPICAL_SAMPLES).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import product

from transformers import JanusConfig

from model.config import model_config
from model.sample import TASKS
from model.stages import NEVER_TRAINED, Stage, part_of
from model.summary import meta_model
from pipeline.ds_config import MIN_BUCKET, template_path
from pipeline.metrics import BatchCounts, llm_gets_gradient, training_flops
from pipeline.planning.memory import (
    BF16,
    CUDA_CONTEXT,
    FP32,
    FRAGMENTATION,
    GIB,
    NCCL_PER_GROUP,
    TYPICAL_SAMPLES,
    MemoryEstimate,
    estimate_memory,
)

MATMUL_EFFICIENCY = 0.7      # share of bf16 peak large bf16 matmuls reach on these GPUs
HOP_LATENCY_INTER = 5e-6     # seconds per ring hop across nodes
HOP_LATENCY_INTRA = 1e-6     # seconds per ring hop inside a node
MAX_REUSE_DISTANCE = 10 ** 9  # deepspeed's default stage3_max_reuse_distance (elements)
MAX_LIVE_PARAMETERS = 10 ** 9  # deepspeed's default stage3_max_live_parameters, and our templates' (elements)
SHARDINGS = ("zero3", "zero3-hpz", "mics", "zero2")
FROZEN_WEIGHTS = ("partitioned", "persisted")  # --frozen-weights, for the ZeRO-3 kinds
UNAVAILABLE = {"mics": "removed in deepspeed 0.19.8"}


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float   # dense bf16
    memory: float       # bytes


GPUS = {
    "a100-40g": Gpu("A100 40GB", 312e12, 40 * GIB),
    "a100-80g": Gpu("A100 80GB", 312e12, 80 * GIB),
    "h100": Gpu("H100 SXM 80GB", 989e12, 80 * GIB),
    "h200": Gpu("H200 141GB", 989e12, 141e9),
}


@dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    nodes: int
    gpus_per_node: int = 8
    intra_node_gbps: float = 2400.0   # NVLink bus bandwidth per GPU, Gb/s
    inter_node_gbps: float = 200.0    # network per GPU, Gb/s

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


# ---- what ZeRO-3 gathers: the module trace of one micro-batch ----

@dataclass(frozen=True)
class Unit:
    """A module with parameters of its own: what one all-gather fetches."""

    name: str
    elements: int       # all its own parameters (what the reuse-distance walk counts)
    gathered: int       # its non-persistent ones (what an all-gather moves)
    trainable: int      # its trainable ones (what a reduce-scatter moves)
    backward: bool      # its backward runs (gathered again)
    block: str | None   # the checkpointed layer it belongs to, recomputed in backward


def forward_order(name: str) -> int:
    """Rank of a module's part in Janus' forward: token embedding, encoders and adaptors, LLM, then the heads."""
    order = ("model.language_model.embed_tokens", "model.vision_model", "model.aligner", "model.generation_embeddings",
             "model.generation_aligner", "model.language_model.layers", "model.language_model.norm", "lm_head",
             "model.generation_head")
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))


def module_units(config: JanusConfig, trainable: tuple[str, ...], persistence_threshold: int,
                 checkpointing: bool) -> list[Unit]:
    """Modules with parameters in forward order (the VQ is preprocessing: never in the training forward)."""
    meta = meta_model(config)
    counts = BatchCounts(und_images=1, gen_image_tokens=1)
    llm_grad = llm_gets_gradient(counts, trainable)
    units = []
    for name, module in meta.named_modules():
        params = [(f"{name}.{n}" if name else n, p) for n, p in module.named_parameters(recurse=False)]
        unused = ("model.vqmodel.", *NEVER_TRAINED)  # preprocessing's VQ; SigLIP's attention-pool head
        if not params or f"{name}.".startswith(unused):
            continue
        part = part_of(params[0][0])
        trains = [p.numel() for n, p in params if part_of(n) in trainable and not n.startswith(NEVER_TRAINED)]
        grad_flows = llm_grad and part in ("llm", "lm_head", "gen_head") and "embed_tokens" not in name
        block = None
        if checkpointing and name.startswith("model.language_model.layers."):
            block = ".".join(name.split(".")[:4])
        units.append(Unit(name=name, elements=sum(p.numel() for _, p in params),
                          gathered=sum(p.numel() for _, p in params if p.numel() > persistence_threshold),
                          trainable=sum(trains), backward=bool(trains) or grad_flows, block=block))
    return sorted(units, key=lambda u: forward_order(u.name))  # stable: definition order inside a part


def trace(units: list[Unit]) -> list[tuple[Unit, bool]]:
    """(unit, in backward) in the order DeepSpeed records fetches: the forward, then the backward in reverse, where a
    checkpointed layer first reruns its forward."""
    out = [(u, False) for u in units]
    backward = [u for u in reversed(units) if u.backward]
    i = 0
    while i < len(backward):
        block = backward[i].block
        j = i
        while j < len(backward) and block is not None and backward[j].block == block:
            j += 1
        if j > i:  # a checkpointed layer: recompute forward, then its backward
            out += [(u, True) for u in reversed(backward[i:j])] + [(u, True) for u in backward[i:j]]
            i = j
        else:
            out.append((backward[i], True))
            i += 1
    return out


@dataclass(frozen=True)
class Gathers:
    """Elements all-gathered in one micro-batch, and the most held at once."""

    forward: int
    backward: int
    forward_calls: int
    backward_calls: int
    peak_held: int
    forward_frozen: int   # of `forward`, in modules with nothing trainable (hpZ keeps their node copy for good)
    frozen_once: int = 0        # persisted frozen modules: gathered once per step (in its first micro-batch)
    frozen_once_calls: int = 0
    forward_frozen_calls: int = 0


def gathered_elements(units: list[Unit], reuse_distance: int = MAX_REUSE_DISTANCE,
                      prefetch_bucket: int = MIN_BUCKET, persist_frozen: bool = False,
                      max_live: int = MAX_LIVE_PARAMETERS) -> Gathers:
    """Walk the trace as deepspeed's coordinator (PartitionedParameterCoordinator) does once it has recorded it:

    - fetch: gather the module if it is not held; then the prefetcher reads on in the trace, gathering modules not
      held until `prefetch_bucket` elements are in flight, and passing held ones for free while marking their
      later use as "fetched for";
    - release: keep a module whose later use the prefetcher already passed (`__params_to_release`' skip rule), or
      that reappears within `reuse_distance` elements of the rest of the trace; release the rest.

    The prefetcher reads at most min(max_live - elements gathered now, prefetch_bucket) ahead (deepspeed's
    `max_params_to_prefetch`): once `stage3_max_live_parameters` elements are held it stops, and what it has not
    read past is released. So a prefetch bucket as large as the model keeps everything from the forward to the
    backward only for models smaller than max_live; a 7B model is mostly gathered again in the backward.

    `persist_frozen` (`--frozen-weights persisted`): modules with nothing trainable are never released once
    gathered; they count in `frozen_once` (the step's first micro-batch), not in `forward`/`backward` (every
    micro-batch), nor in `peak_held` (the memory estimate holds them whole)."""
    steps = trace(units)
    persisted = {u.name for u in units if persist_frozen and not u.trainable}
    held: set[str] = set()
    fetched_for: dict[str, int] = {}
    totals, calls, once = [0, 0], [0, 0], [0, 0]
    peak = frozen = frozen_calls = ahead = 0

    def gather(unit: Unit, backward: bool) -> None:
        nonlocal frozen, frozen_calls
        held.add(unit.name)
        if unit.name in persisted:
            once[0] += unit.gathered
            once[1] += 1
            return
        totals[backward] += unit.gathered
        calls[backward] += 1
        frozen += unit.gathered if not (backward or unit.trainable) else 0
        frozen_calls += not (backward or unit.trainable)

    for i, (unit, backward) in enumerate(steps):
        if unit.gathered and unit.name not in held:
            gather(unit, backward)
        ahead = max(ahead, i + 1)
        in_flight = 0
        # persisted frozen parameters do not count: pipeline/engine.py raises max_live by them
        live = sum(u.gathered for u in units if u.name in held and u.name not in persisted)
        budget = min(max_live - live, prefetch_bucket)
        while ahead < len(steps) and in_flight < budget:
            later, later_backward = steps[ahead]
            if later.gathered and later.name not in held:
                gather(later, later_backward)
                in_flight += later.gathered
            fetched_for[later.name] = max(fetched_for.get(later.name, -1), ahead)
            ahead += 1
        peak = max(peak, sum(u.gathered for u in units if u.name in held and u.name not in persisted))
        walked, soon = 0, set()
        for later, _ in steps[i + 1:]:
            if walked >= reuse_distance:
                break
            soon.add(later.name)
            walked += later.elements
        if unit.name not in soon and fetched_for.get(unit.name, -1) <= i + 1 and unit.name not in persisted:
            held.discard(unit.name)
    return Gathers(totals[0], totals[1], calls[0], calls[1], peak, frozen, once[0], once[1], frozen_calls)


# ---- bytes and seconds of one step per sharding ----

@dataclass(frozen=True)
class Collective:
    kind: str           # all-gather, reduce-scatter, all-reduce
    what: str
    full_bytes: float   # size of the whole tensor (all ranks' parts)
    group: int          # GPUs taking part
    across_nodes: bool
    calls: int

    @property
    def wire_bytes(self) -> float:
        """Bytes each GPU sends (NCCL ring)."""
        share = (self.group - 1) / self.group if self.group > 1 else 0.0
        return self.full_bytes * share * (2 if self.kind == "all-reduce" else 1)

    def seconds(self, cluster: Cluster) -> float:
        if self.group <= 1:
            return 0.0
        gbps = cluster.inter_node_gbps if self.across_nodes else cluster.intra_node_gbps
        hop = HOP_LATENCY_INTER if self.across_nodes else HOP_LATENCY_INTRA
        return self.wire_bytes * 8 / (gbps * 1e9) + self.calls * (self.group - 1) * hop


def micro_batch_collectives(sharding: str, gathers: Gathers, trainable: int, cluster: Cluster, first: bool,
                            reduce_bucket: int, grad_bytes: int = BF16, param_bytes: int = BF16) -> list[Collective]:
    """What one micro-batch communicates; `first`: the step's first micro-batch (hpZ's cross-node gather of the
    trainable modules; frozen ones keep their node copy from the first step on)."""
    world, node = cluster.world, min(cluster.gpus_per_node, cluster.world)
    multi = cluster.nodes > 1
    buckets = -(-trainable // reduce_bucket)
    if sharding == "zero2":  # each bucket all-reduced whole, each rank keeping its part (see the module docstring)
        return [Collective("all-reduce", "gradients", grad_bytes * trainable, world, multi, buckets)]
    # Persisted frozen modules: gathered in the step's first micro-batch only; under hpZ from the node copy that
    # is never dropped for frozen parameters, so in the node from the second step on.
    in_node = sharding in ("zero3-hpz", "mics")
    once = [Collective("all-gather", "frozen parameters, once per step", param_bytes * gathers.frozen_once,
                       node if in_node else world, multi and not in_node, gathers.frozen_once_calls)
            ] if first and gathers.frozen_once else []
    rs = Collective("reduce-scatter", "gradients", grad_bytes * trainable, node if sharding == "mics" else world,
                    multi and sharding != "mics", buckets)
    forward = [Collective("all-gather", "parameters, forward", param_bytes * gathers.forward, world, multi,
                          gathers.forward_calls)]
    if sharding == "zero3-hpz":
        across = gathers.forward - gathers.forward_frozen if first else 0
        forward = [Collective("all-gather", "parameters, forward", param_bytes * across, world, multi,
                              gathers.forward_calls - gathers.forward_frozen_calls if across else 0),
                   Collective("all-gather", "parameters, forward", param_bytes * (gathers.forward - across), node,
                              False, gathers.forward_calls)]
    elif sharding == "mics":
        forward = [replace(forward[0], group=node, across_nodes=False)]
    bwd_group, bwd_across = (world, multi) if sharding == "zero3" else (node, False)
    return [*once, *forward, Collective("all-gather", "parameters, backward", param_bytes * gathers.backward,
                                        bwd_group, bwd_across, gathers.backward_calls), rs]


def step_boundary_collectives(sharding: str, trainable: int, cluster: Cluster, grad_bytes: int = BF16,
                              param_bytes: int = BF16) -> list[Collective]:
    """What runs once per step, after the last backward (not overlapped with compute)."""
    if sharding == "zero2":
        return [Collective("all-gather", "updated weights", param_bytes * trainable, cluster.world,
                           cluster.nodes > 1, 1)]
    if sharding == "mics":  # the node-sharded gradients, all-reduced across the nodes' replicas
        return [Collective("all-reduce", "gradients across replicas", grad_bytes * trainable / cluster.gpus_per_node,
                           cluster.nodes, cluster.nodes > 1, 1)]
    return []


def expected_counts(stage: Stage, rows: int) -> BatchCounts:
    """A micro-batch of `rows` rows packed full with typical samples in the stage's ratio (by samples)."""
    shapes = [TYPICAL_SAMPLES[task] for task in TASKS]
    per_cycle = sum(r * s.tokens for r, s in zip(stage.ratio, shapes, strict=True))
    cycles = rows * stage.seq_len / per_cycle

    def total(value) -> int:
        return round(cycles * sum(r * value(s) for r, s in zip(stage.ratio, shapes, strict=True)))

    image_targets = total(lambda s: s.image_targets)
    return BatchCounts(rows=rows, row_tokens=rows * stage.seq_len, real_tokens=rows * stage.seq_len,
                       samples=total(lambda s: 1), segment_sq_sum=total(lambda s: s.tokens ** 2),
                       text_targets=total(lambda s: s.text_targets), image_targets=image_targets,
                       und_images=total(lambda s: s.und_images), gen_image_tokens=image_targets)


@dataclass(frozen=True)
class PlanRow:
    sharding: str
    micro_batch_rows: int
    bucket: int                 # reduce bucket, elements
    prefetch: int               # stage3_prefetch_bucket_size, elements
    accumulation: int
    checkpointing: bool
    model_flops: float          # one step, whole job
    hardware_flops: float
    flops_by_part: dict
    collectives: list           # one step, per GPU: (Collective, times per step)
    compute_s: float
    comm_s: float
    boundary_s: float
    step_s: float
    mfu: float
    tokens_per_s: float
    days: float
    memory: float               # bytes per GPU
    fits: bool
    available: bool
    grad_bytes: int = BF16      # gradients reduced in bf16, or in fp32 (FP32) where that costs no step time
    frozen_weights: str = "partitioned"  # --frozen-weights (ZeRO-3 kinds), or "whole" (ZeRO-2 keeps every weight)

    @property
    def bytes_by_kind(self) -> dict[str, float]:
        """Wire bytes per GPU per step, by collective and whether it crosses nodes."""
        out: dict[str, float] = {}
        for c, times in self.collectives:
            key = f"{c.kind} {c.what} ({'across nodes' if c.across_nodes else 'in node'})"
            out[key] = out.get(key, 0.0) + c.wire_bytes * times
        return out


def sharded_memory(sharding: str, est: MemoryEstimate, cluster: Cluster, gathers: Gathers, reduce_bucket: int,
                   grad_bytes: int = BF16, persist_frozen: bool = False) -> float:
    """Bytes per GPU of one choice: model states by its sharding, what ZeRO gathers, the frozen weights whole when
    persisted, activations, the worst row's logits, the full head gradients, buckets, CUDA context and NCCL buffers,
    then the fragmentation margin."""
    p = est.params
    node = min(cluster.gpus_per_node, cluster.world)
    shards = node if sharding == "mics" else cluster.world
    weights = {"zero3": BF16 * p.total / shards, "zero3-hpz": BF16 * p.total * (1 / shards + 1 / node),
               "mics": BF16 * p.total / shards, "zero2": BF16 * p.total}[sharding]
    states = (BF16 + FP32 + 2 * FP32) * p.trainable / shards
    gathered = 0.0 if sharding == "zero2" else BF16 * gathers.peak_held
    gathered += est.frozen_whole if persist_frozen and sharding != "zero2" else 0.0
    groups = 2 if sharding in ("zero3-hpz", "mics") else 1
    used = (weights + states + gathered + est.activations + max(est.worst_logits, est.logits) + est.head_gradients
            + 2 * grad_bytes * reduce_bucket + CUDA_CONTEXT + groups * NCCL_PER_GROUP)
    return used * (1 + FRAGMENTATION)


def bucket_choices(config: JanusConfig, decoder_layer: int) -> tuple[tuple[int, int], ...]:
    """(reduce bucket, prefetch bucket) in elements: today's (h*h and 0.9*h*h above the floor, as
    pipeline/ds_config.py fills them), and the lever (one decoder layer's parameters for both)."""
    width = config.text_config.hidden_size
    today = (max(width * width, MIN_BUCKET), max(int(0.9 * width * width), MIN_BUCKET))
    layer = max(decoder_layer, MIN_BUCKET)
    return today, (layer, layer)


def plan_rows(model: str | JanusConfig, stage: Stage, cluster: Cluster, micro_batches: tuple[int, ...] = (1, 2, 4),
              checkpointing: tuple[bool, ...] = (True, False), persistence_threshold: int | None = None,
              buckets: tuple[tuple[int, int], ...] | None = None,
              frozen_choices: tuple[str, ...] = FROZEN_WEIGHTS) -> list[PlanRow]:
    """Every sharding x micro-batch x checkpointing x bucket x frozen-weights choice whose micro-batches divide the
    step."""
    config = model if isinstance(model, JanusConfig) else model_config(model)
    width = config.text_config.hidden_size
    threshold = 10 * width if persistence_threshold is None else persistence_threshold
    per_rank = stage.rows_per_step // cluster.world
    rows = []
    for ckpt in checkpointing:
        units = module_units(config, tuple(stage.trainable), threshold, ckpt)
        trainable = sum(u.trainable for u in units)
        # ZeRO-2 keeps every weight whole (one row); with nothing frozen gathered (Stage III) persisted is partitioned.
        frozen_gathered = any(u.gathered and not u.trainable for u in units)
        frozen_for = {s: ("whole",) if s == "zero2" else tuple(f for f in frozen_choices
                                                               if f != "persisted" or frozen_gathered)
                      for s in SHARDINGS}
        gathers_by_choice: dict[tuple[int, bool], Gathers] = {}
        for mb in micro_batches:
            if per_rank < mb or per_rank % mb or stage.rows_per_step % cluster.world:
                continue
            est = estimate_memory(config, stage, cluster.world, mb, stage.seq_len, ckpt, cluster.gpus_per_node)
            counts = expected_counts(stage, mb)
            flops = training_flops(counts, config, stage.trainable, ckpt)
            accumulation = per_rank // mb
            compute = accumulation * flops.hardware / (cluster.gpu.peak_flops * MATMUL_EFFICIENCY)
            sizes = buckets or bucket_choices(config, est.params.decoder_layer)
            choices = [(s, b, f) for s, b in product(SHARDINGS, sizes) for f in frozen_for[s]]
            for sharding, (bucket, prefetch), frozen_weights in choices:
                persist = frozen_weights == "persisted"
                if (prefetch, persist) not in gathers_by_choice:
                    gathers_by_choice[prefetch, persist] = gathered_elements(units, prefetch_bucket=prefetch,
                                                                             persist_frozen=persist)
                gathers = gathers_by_choice[prefetch, persist]
                # Gradients summed in fp32 where that costs no step time (the reduce-scatter stays hidden under
                # compute) and still fits; otherwise in bf16 (DeepSpeed's default for a bf16 model).
                costed = {}
                for grad_bytes in (BF16, FP32):
                    first = micro_batch_collectives(sharding, gathers, trainable, cluster, True, bucket, grad_bytes)
                    later = micro_batch_collectives(sharding, gathers, trainable, cluster, False, bucket, grad_bytes)
                    boundary = step_boundary_collectives(sharding, trainable, cluster, grad_bytes)
                    comm = sum(c.seconds(cluster) for c in first) + (accumulation - 1) * sum(
                        c.seconds(cluster) for c in later)
                    boundary_s = sum(c.seconds(cluster) for c in boundary)
                    memory = sharded_memory(sharding, est, cluster, gathers, bucket, grad_bytes, persist)
                    costed[grad_bytes] = (max(compute, comm) + boundary_s, memory, first, later, boundary, comm,
                                          boundary_s)
                fp32_free = costed[FP32][0] <= costed[BF16][0] and costed[FP32][1] <= cluster.gpu.memory
                grad_bytes = FP32 if fp32_free else BF16
                step, memory, first, later, boundary, comm, boundary_s = costed[grad_bytes]
                model_flops = cluster.world * accumulation * flops.model
                collectives = [(c, n) for c, n in [(c, 1) for c in first] + [(c, accumulation - 1) for c in later]
                               + [(c, 1) for c in boundary] if n and c.full_bytes]
                rows.append(PlanRow(
                    sharding=sharding, micro_batch_rows=mb, bucket=bucket, prefetch=prefetch,
                    accumulation=accumulation,
                    checkpointing=ckpt,
                    model_flops=model_flops, hardware_flops=cluster.world * accumulation * flops.hardware,
                    flops_by_part={k: cluster.world * accumulation * v for k, v in flops.parts.items()},
                    collectives=collectives, compute_s=compute, comm_s=comm, boundary_s=boundary_s, step_s=step,
                    mfu=model_flops / (step * cluster.world * cluster.gpu.peak_flops),
                    tokens_per_s=stage.rows_per_step * stage.seq_len / step,
                    days=stage.train_steps * step / 86400, memory=memory, fits=memory <= cluster.gpu.memory,
                    available=sharding not in UNAVAILABLE, grad_bytes=grad_bytes, frozen_weights=frozen_weights))
    return rows


def recommended(rows: list[PlanRow]) -> PlanRow | None:
    """The fastest available choice that fits memory (of equally fast ones, one reducing gradients in fp32, then the
    one needing least memory)."""
    usable = [r for r in rows if r.fits and r.available]
    return min(usable, key=lambda r: (round(r.step_s, 3), r.grad_bytes != FP32, r.memory)) if usable else None


def recommended_template(row: PlanRow, gpus_per_node: int) -> dict:
    """zero3_bf16.json with the row's sharding and buckets: save it and pass it as --ds-config."""
    config = json.loads(template_path("zero3_bf16").read_text())
    zero = config["zero_optimization"]
    zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"] = row.bucket, row.prefetch  # as costed
    if row.sharding == "zero3-hpz":
        zero["zero_hpz_partition_size"] = gpus_per_node
    if row.grad_bytes == FP32:
        config["communication_data_type"] = "fp32"  # each bf16 gradient cast to fp32, then reduce-scattered
    if row.sharding == "zero2":
        zero["stage"] = 2
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    return config


def predicted_logged_bytes(units: list[Unit], world: int, micro_batches: int, param_bytes: int,
                           grad_bytes: int, reuse_distance: int = MAX_REUSE_DISTANCE,
                           prefetch_bucket: int = MIN_BUCKET, persist_frozen: bool = False,
                           sharding: str = "zero3", max_live: int = MAX_LIVE_PARAMETERS) -> dict[str, float]:
    """What deepspeed's comms logger records per step of `micro_batches` under ZeRO-3 (an all-gather logs its input,
    this rank's partition: 1/world of the gathered tensor; a reduce-scatter its input, the whole bucket), or
    ZeRO-2 (an all-reduce logs the whole bucket; the step's all-gather this rank's part of the trainable weights)."""
    trainable = sum(u.trainable for u in units)
    if sharding == "zero2":
        return {"all_reduce": micro_batches * grad_bytes * trainable,
                "all_gather_into_tensor": param_bytes * trainable / world}
    gathers = gathered_elements(units, reuse_distance, prefetch_bucket, persist_frozen, max_live)
    gathered = micro_batches * (gathers.forward + gathers.backward) + gathers.frozen_once
    return {"all_gather_into_tensor": param_bytes * gathered / world,
            "reduce_scatter_tensor": micro_batches * grad_bytes * trainable}


def format_plan(rows: list[PlanRow], cluster: Cluster, stage_name: str) -> str:
    """The plan table, the recommended choice with its bytes per collective and FLOPs by part, and the assumptions."""
    best = recommended(rows)
    head = (f"Performance plan, {stage_name}, {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} "
            f"({cluster.gpu.memory / GIB:.0f} GiB, {cluster.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16), "
            f"{cluster.intra_node_gbps:g} Gb/s in node, {cluster.inter_node_gbps:g} Gb/s across nodes per GPU")
    out = [head,
           f"  {'sharding':<10} {'frozen':<11} {'rows/mb':>7} {'accum':>5} {'ckpt':>4} {'grads':>5} {'bucket M':>8} "
           f"{'compute s':>9} {'comm s':>7} {'step s':>7} {'MFU':>6} {'tok/s':>9} {'days':>7} {'GiB/GPU':>8}  note"]
    # An unavailable sharding is shown once, its best row, for comparison.
    shown = [r for r in rows if r.available] + [
        min((r for r in rows if r.sharding == name and r.fits), key=lambda r: r.step_s)
        for name in UNAVAILABLE if any(r.sharding == name and r.fits for r in rows)]
    for r in sorted(shown, key=lambda r: r.step_s):
        note = UNAVAILABLE.get(r.sharding, "" if r.fits else "does not fit")
        mark = "*" if r is best else " "
        ckpt = "on" if r.checkpointing else "off"
        grads = "fp32" if r.grad_bytes == FP32 else "bf16"
        out.append(f"{mark} {r.sharding:<10} {r.frozen_weights:<11} {r.micro_batch_rows:>7} {r.accumulation:>5} "
                   f"{ckpt:>4} {grads:>5} {r.bucket / 1e6:>8.1f} {r.compute_s:>9.2f} {r.comm_s:>7.2f} "
                   f"{r.step_s:>7.2f} {r.mfu:>6.1%} {r.tokens_per_s:>9.0f} {r.days:>7.1f} {r.memory / GIB:>8.1f}  "
                   f"{note}")
    if best is None:
        out.append("No choice fits memory: add nodes or a larger GPU.")
    else:
        out.append(f"Recommended (*): {best.sharding}, frozen weights {best.frozen_weights}, "
                   f"{best.micro_batch_rows} row(s) per micro-batch, "
                   f"checkpointing {'on' if best.checkpointing else 'off'}, gradients reduced in "
                   f"{'fp32' if best.grad_bytes == FP32 else 'bf16'}, buckets of {best.bucket:,} elements: "
                   f"MFU {best.mfu:.1%}, {best.days:.1f} days")
        # varlen: the plan's attention FLOPs are each sample's own (sdpa would compute the micro-batch's square)
        flags = f"--rows-per-micro-batch {best.micro_batch_rows} --attention varlen" + (
            " --gradient-checkpointing" if best.checkpointing else "") + (
            " --frozen-weights persisted" if best.frozen_weights == "persisted" else "")
        out.append(f"  run it: {flags} --ds-config FILE, FILE holding "
                   f"{json.dumps(recommended_template(best, cluster.gpus_per_node), separators=(',', ':'))}")
        out.append("  per step, per GPU, bytes sent by collective:")
        out += [f"    {k:<58} {v / 1e9:>8.2f} GB" for k, v in best.bytes_by_kind.items()]
        out.append(f"  per step, FLOPs by part (whole job, model {best.model_flops:.3g}, with recompute "
                   f"{best.hardware_flops:.3g}):")
        out += [f"    {k:<20} {v:.3g}" for k, v in best.flops_by_part.items() if v]
    out += ["Assumptions: rings move (g-1)/g of a collective per GPU at the group's link bandwidth, "
            f"+{HOP_LATENCY_INTER * 1e6:g} us per hop across nodes; compute at {MATMUL_EFFICIENCY:.0%} of bf16 peak on "
            "model FLOPs + recompute; compute and gathers/reduce-scatters overlap fully (step = max of the two, plus "
            "step-boundary collectives); ZeRO-2 all-reduces its gradients (DeepSpeed's default); persisted frozen "
            "weights are gathered once per step (DeepSpeed's optimizer step partitions every parameter), in the node "
            "under hpZ, and held whole; gradients reduced in fp32 where that keeps them hidden and fits (twice "
            "bf16's bytes), else in bf16; rows packed full with the stage's typical samples; memory adds the "
            f"worst row's logits (all text), full head gradients, {CUDA_CONTEXT / GIB:g} GiB CUDA context, "
            f"{NCCL_PER_GROUP / GIB:g} GiB NCCL per communicator and a {FRAGMENTATION:.0%} fragmentation margin."]
    return "\n".join(out)


def cluster_for(gpu: str, nodes: int, gpus_per_node: int, intra_gbps: float, inter_gbps: float) -> Cluster:
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu}: choose from {', '.join(GPUS)}")
    return Cluster(GPUS[gpu], nodes, gpus_per_node, intra_gbps, inter_gbps)


def stage_plan(model: str, stage: Stage, cluster: Cluster, stage_name: str, checkpointing: bool | None = None) -> str:
    """The printed plan for a model and stage on a cluster."""
    ckpt = (True, False) if checkpointing is None else (checkpointing,)
    return format_plan(plan_rows(model, stage, cluster, checkpointing=ckpt), cluster, stage_name)
