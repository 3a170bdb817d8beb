"""The gather trace: which modules ZeRO-3 all-gathers in one micro-batch, in what order, and the most it holds at once.

Read from deepspeed 0.19.8's `deepspeed.runtime.zero` (partition_parameters, partitioned_param_coordinator, stage3):

- forward: one all-gather (`all_gather_into_tensor`) per module with parameters, of that module's parameters
  not marked persistent (numel <= stage3_param_persistence_threshold: gathered once after each optimizer step);
- backward: the same again for every module whose backward runs (it trains, or a gradient flows through it),
  except parameters still held: when a module is released, every parameter that reappears within the next
  `stage3_max_reuse_distance` elements of the recorded trace is kept, and so is one whose later use the
  prefetcher has already read past (see `gathered_elements`), so the last layers of the forward are not gathered
  again at the turn into the backward.

`--frozen-weights persisted` (pipeline/engine.py's `persist_frozen`) marks ZeRO-3's frozen parameters `ds_persist`:
the coordinator never releases them once its trace is recorded, but the optimizer step partitions every parameter,
so a frozen module is gathered once per step, in its first micro-batch, and never in a backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from transformers import JanusConfig

from model.stages import NEVER_TRAINED, part_of
from model.summary import meta_model
from pipeline.ds_config import MAX_LIVE_PARAMETERS, MAX_REUSE_DISTANCE, MIN_BUCKET, ZeroSizes
from pipeline.metrics import BatchCounts, llm_gets_gradient
from pipeline.planning.memory import NOT_IN_FORWARD, Setting, Workload


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
    """Modules with parameters in forward order, less NOT_IN_FORWARD (never gathered in training)."""
    meta = meta_model(config)
    counts = BatchCounts(und_images=1, gen_image_tokens=1)
    llm_grad = llm_gets_gradient(counts, trainable)
    units = []
    for name, module in meta.named_modules():
        params = [(f"{name}.{n}" if name else n, p) for n, p in module.named_parameters(recurse=False)]
        if not params or f"{name}.".startswith(NOT_IN_FORWARD):
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


# The plan costs some hundred settings that share a few traces: each trace and walk is made once per workload.
@lru_cache(maxsize=16)
def workload_units(work: Workload, persistence_threshold: int, checkpointing: bool) -> tuple[Unit, ...]:
    return tuple(module_units(work.config, tuple(work.stage.trainable), persistence_threshold, checkpointing))


@lru_cache(maxsize=64)
def workload_gathers(work: Workload, zero: ZeroSizes, checkpointing: bool, persist_frozen: bool) -> Gathers:
    units = list(workload_units(work, zero.persistence_threshold, checkpointing))
    return gathered_elements(units, zero.reuse_distance, zero.prefetch_bucket, persist_frozen, zero.max_live)


def setting_gathers(work: Workload, setting: Setting) -> tuple[list[Unit], Gathers]:
    """The modules a setting's forward gathers, and what its micro-batch gathers."""
    units = list(workload_units(work, setting.zero.persistence_threshold, setting.checkpointing))
    return units, workload_gathers(work, setting.zero, setting.checkpointing, setting.frozen_weights == "persisted")


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
