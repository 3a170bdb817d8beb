"""The collective cost model: what each sharding communicates per micro-batch and per step, and how long it takes.

Read from deepspeed 0.19.8's `deepspeed.runtime.zero` (stage3) and `deepspeed.runtime.comm.coalesced_collectives`:
every trainable parameter's gradient is reduce-scattered (`reduce_scatter_tensor`) in each micro-batch's backward,
in `communication_data_type` (the parameters' dtype unless set); the parameters are all-gathered as gathers.py
traces them.

hpZ (`zero_hpz_partition_size`, the plan's choice: GPUs per node) keeps a second bf16 partition inside its group:
a parameter's first gather after an optimizer step crosses the nodes, every later one stays in the group. Trainable
parameters' secondary copies are dropped at each step (`invalidate_secondary_tensor` walks the fp16 groups only),
frozen ones are kept, so a frozen module crosses the nodes once per run; persisted frozen modules are gathered in
the group too. MiCS was removed in deepspeed 0.19.8 (its config keys raise): it is costed for comparison and never
recommended. ZeRO-2 keeps every weight whole: it all-reduces gradients every micro-batch, not a reduce-scatter
(`use_multi_rank_bucket_allreduce`, on by default, sends each bucket whole through `allreduce_and_scatter` and each
rank keeps its part: twice a reduce-scatter's bytes; the comms logger sees `all_reduce`), and all-gathers the
updated trainable weights once per step.

A collective over a group of g GPUs moves (g - 1) / g of its full size per GPU for an all-gather or a reduce-scatter,
twice that for an all-reduce (NCCL rings). Its bus bandwidth is NVLink's inside a node and, for a group spanning nodes,
the node's NIC aggregate (hardware.py: NCCL runs a ring channel per NIC, so every node's NICs carry the ring at once).
Latency follows NCCL's own tuning model (src/graph/tuning.cc, ring / Simple protocol): a base per call, then one hop
latency per ring step, NVLink's for steps inside a node and the network's only for the steps that cross one; an
all-reduce takes the tree where that is quicker (2 log2(nodes) network hops instead of 2 (g - 1) steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.planning.gathers import Gathers
from pipeline.planning.hardware import Gpu, Network, gpu_named, network_for
from pipeline.planning.memory import BF16, Setting

# NCCL's tuning model (src/graph/tuning.cc, Simple protocol, the one large messages use), microseconds: a ring pays
# a base latency per call and one hop latency per step (NVLink's, or the network's for the steps that cross nodes);
# a tree (all-reduce only) no base, and twice (GPUs per node - 1) NVLink hops plus log2(nodes) network hops.
RING_BASE_LATENCY = 8.4e-6
NVLINK_STEP_LATENCY = 3.4e-6
NETWORK_STEP_LATENCY = 9.6e-6
TREE_NVLINK_LATENCY = 28e-6
TREE_NETWORK_LATENCY = 50e-6


@dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    nodes: int
    gpus_per_node: int = 8
    network: Network | None = None   # None: the GPU type's typical node (hardware.py)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node(self) -> int:
        """GPUs of one node taking part: MiCS's shard group, the plan's hpZ group."""
        return min(self.gpus_per_node, self.world)

    @property
    def links(self) -> Network:
        return self.network or network_for(self.gpu)


def cluster_for(gpu: str, nodes: int, gpus_per_node: int, nics_per_node: int | None = None,
                nic_gbps: float | None = None, nvlink_bus_gbps: float | None = None) -> Cluster:
    """`nodes` x `gpus_per_node` GPUs of type `gpu`; network figures not given are the GPU type's typical node's."""
    chip = gpu_named(gpu)
    return Cluster(chip, nodes, gpus_per_node, network_for(chip, nics_per_node, nic_gbps, nvlink_bus_gbps))


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

    def nodes_spanned(self, cluster: Cluster) -> int:
        return -(-self.group // cluster.gpus_per_node) if self.across_nodes else 1

    def latency(self, cluster: Cluster) -> float:
        """One call's latency: NCCL's ring (or, for an all-reduce, the quicker of two rings and a tree)."""
        nodes = self.nodes_spanned(cluster)
        steps = self.group - 1
        ring = RING_BASE_LATENCY + (steps - (nodes - 1)) * NVLINK_STEP_LATENCY + (nodes - 1) * NETWORK_STEP_LATENCY
        if self.kind != "all-reduce":
            return ring
        in_node = min(self.group, cluster.gpus_per_node) - 1
        tree = 2 * (in_node * TREE_NVLINK_LATENCY + math.ceil(math.log2(nodes)) * TREE_NETWORK_LATENCY)
        return min(2 * ring - RING_BASE_LATENCY, tree)

    def seconds(self, cluster: Cluster, bandwidth_scale: float = 1.0) -> float:
        """Wire bytes at the bus bandwidth of the links it crosses (scaled for a range), plus latency per call."""
        if self.group <= 1:
            return 0.0
        links = cluster.links
        bandwidth = links.node_bytes_per_s if self.across_nodes else links.nvlink_bus_bytes_per_s
        return self.wire_bytes / (bandwidth * bandwidth_scale) + self.calls * self.latency(cluster)


def micro_batch_collectives(setting: Setting, gathers: Gathers, trainable: int, cluster: Cluster, first: bool,
                            param_bytes: int = BF16) -> list[Collective]:
    """What one micro-batch communicates; `first`: the step's first micro-batch (hpZ's cross-node gather of the
    trainable modules; frozen ones keep their secondary copy from the first step on)."""
    sharding, grad_bytes, world = setting.sharding, setting.grad_bytes, cluster.world
    multi = cluster.nodes > 1
    buckets = -(-trainable // setting.zero.reduce_bucket)
    if sharding == "zero2":  # each bucket all-reduced whole, each rank keeping its part (see the module docstring)
        return [Collective("all-reduce", "gradients", grad_bytes * trainable, world, multi, buckets)]
    # The group a gather stays in once the weights have a copy there: hpZ's secondary partition, MiCS's node.
    group = {"zero3-hpz": setting.hpz, "mics": cluster.node}.get(sharding, world)
    group_across = multi and group > cluster.gpus_per_node
    # Persisted frozen modules: gathered in the step's first micro-batch only; under hpZ from the secondary copy that
    # is never dropped for frozen parameters, so in the group from the second step on.
    once = [Collective("all-gather", "frozen parameters, once per step", param_bytes * gathers.frozen_once,
                       group, group_across, gathers.frozen_once_calls)] if first and gathers.frozen_once else []
    mics = sharding == "mics"  # gradients reduce-scattered within the node's shard group
    rs = Collective("reduce-scatter", "gradients", grad_bytes * trainable, cluster.node if mics else world,
                    multi and not mics, buckets)
    forward = [Collective("all-gather", "parameters, forward", param_bytes * gathers.forward, world, multi,
                          gathers.forward_calls)]
    if sharding == "zero3-hpz":
        across = gathers.forward - gathers.forward_frozen if first else 0
        forward = [Collective("all-gather", "parameters, forward", param_bytes * across, world, multi,
                              gathers.forward_calls - gathers.forward_frozen_calls if across else 0),
                   Collective("all-gather", "parameters, forward", param_bytes * (gathers.forward - across), group,
                              group_across, gathers.forward_calls)]
    elif sharding == "mics":
        forward = [replace(forward[0], group=group, across_nodes=group_across)]
    return [*once, *forward, Collective("all-gather", "parameters, backward", param_bytes * gathers.backward,
                                        group, group_across, gathers.backward_calls), rs]


def step_boundary_collectives(setting: Setting, trainable: int, cluster: Cluster,
                              param_bytes: int = BF16) -> list[Collective]:
    """What runs once per step, after the last backward (not overlapped with compute)."""
    if setting.sharding == "zero2":
        return [Collective("all-gather", "updated weights", param_bytes * trainable, cluster.world,
                           cluster.nodes > 1, 1)]
    if setting.sharding == "mics":  # the node-sharded gradients, all-reduced across the nodes' replicas
        return [Collective("all-reduce", "gradients across replicas",
                           setting.grad_bytes * trainable / cluster.gpus_per_node, cluster.nodes, cluster.nodes > 1, 1)]
    return []
