"""A generic dense decoder as the step-time model sees it: its FLOPs, its memory-bound traffic and what each sharding
communicates, per micro-batch of `micro_batch` sequences of `seq_len` tokens on one GPU.

FLOPs per token, as pipeline/metrics.py counts them (per matrix: 2 x weights forward, twice that backward): 6 x (layer
weights x layers + the LM head); the embedding lookup costs nothing. Causal attention: forward 2 x (heads x head_dim)
x seq_len per token and layer, 3x that with the backward. Checkpointing's recompute:
    none       nothing;
    selective  half the layers' forward matmuls and their memory-bound forward (torchtitan's op-level policy saves
               every other matmul's output and the attention's);
    full       the whole layer forward again, attention included.

Communication (FSDP / ZeRO-3: every layer is one gathered unit, as FSDP wraps it): per micro-batch an all-gather of
the weights forward, again backward (resharded after forward), and a reduce-scatter of the gradients; `zero3-hpz`
gathers across the nodes in the step's first micro-batch only, then from the node's copy; `zero2` all-reduces the
gradients every micro-batch and all-gathers the updated weights once a step.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.planning.collectives import Cluster, Collective
from pipeline.planning.step_time import (
    LOGIT_TRAFFIC_BYTES,
    SAVED_BYTES_ALL,
    SAVED_BYTES_TRAINABLE,
    Matmuls,
    MicroBatchWork,
    StepWork,
    layer_traffic,
)

MLPS = ("swiglu", "gelu")
SHARDINGS = ("zero3", "zero3-hpz", "zero2")
CHECKPOINTING = ("none", "selective", "full")
SELECTIVE_MATMUL_SHARE = 0.5  # torchtitan's op-level policy recomputes every other matmul


@dataclass(frozen=True)
class Decoder:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    mlp: str = "swiglu"
    vocab: int = 32000
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.mlp not in MLPS:
            raise ValueError(f"--mlp {self.mlp}: choose from {', '.join(MLPS)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("--hidden must divide by --heads, and --heads by --kv-heads")

    @property
    def q_width(self) -> int:
        return self.hidden

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_weights(self) -> int:
        attention = self.hidden * (2 * self.q_width + 2 * self.kv_width)
        return attention + (3 if self.mlp == "swiglu" else 2) * self.hidden * self.ffn

    @property
    def params(self) -> int:
        return self.layers * self.layer_weights + (1 if self.tied_embeddings else 2) * self.vocab * self.hidden


def decoder_micro_batch(model: Decoder, seq_len: int, micro_batch: int, checkpointing: str) -> MicroBatchWork:
    """One GPU's micro-batch of `micro_batch` full sequences."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"--checkpointing {checkpointing}: choose from {', '.join(CHECKPOINTING)}")
    tokens = micro_batch * seq_len
    layers_fwd = 2.0 * model.layers * model.layer_weights * tokens
    head = 6.0 * model.hidden * model.vocab * tokens
    attention_fwd = 2.0 * model.layers * model.q_width * seq_len * tokens
    traffic = layer_traffic(model.hidden, model.q_width, model.kv_width, model.ffn, model.mlp)
    recompute_share = {"none": 0.0, "selective": SELECTIVE_MATMUL_SHARE, "full": 1.0}[checkpointing]
    memory_fwd = 0.0 if checkpointing == "none" else 1.0
    memory = model.layers * tokens * (traffic.forward * (1 + memory_fwd) + traffic.backward)
    memory += tokens * model.vocab * LOGIT_TRAFFIC_BYTES
    attention = attention_fwd * (3 + (1 if checkpointing == "full" else 0))
    return MicroBatchWork(
        matmuls=(Matmuls(layers_fwd * (3 + recompute_share), model.hidden), Matmuls(head, model.hidden)),
        attention_flops=attention, memory_bytes=memory, model_flops=3 * layers_fwd + head + 3 * attention_fwd,
        tokens=tokens)


def decoder_step(model: Decoder, seq_len: int, micro_batch: int, accumulation: int, cluster: Cluster, sharding: str,
                 checkpointing: str, param_bytes: int = 2, grad_bytes: int = 2) -> StepWork:
    """One optimizer step of `accumulation` micro-batches on one GPU of `cluster`."""
    if sharding not in SHARDINGS:
        raise ValueError(f"--sharding {sharding}: choose from {', '.join(SHARDINGS)}")
    world, multi, params = cluster.world, cluster.nodes > 1, model.params
    units = model.layers + (1 if model.tied_embeddings else 2)  # layers, embedding, head: one gather each
    layer = model.layer_weights

    def gather(what: str, elements: float, group: int, calls: int) -> Collective:
        return Collective("all-gather", what, param_bytes * elements, group, multi and group > cluster.gpus_per_node,
                          calls)

    reduce = Collective("reduce-scatter", "gradients", grad_bytes * params, world, multi, units)
    edges = (gather("first layer", layer, world, 1),
             Collective("reduce-scatter", "last layer", grad_bytes * layer, world, multi, 1))
    if sharding == "zero2":
        reduce = Collective("all-reduce", "gradients", grad_bytes * params, world, multi, units)
        first = later = (reduce,)
        edges = (Collective("all-reduce", "last layer", grad_bytes * layer, world, multi, 1),)
        boundary = (gather("updated weights", params, world, 1),)
    elif sharding == "zero3":
        first = later = (gather("forward", params, world, units), gather("backward", params, world, units), reduce)
        boundary = ()
    else:
        node = cluster.node
        first = (gather("forward", params, world, units), gather("backward", params, node, units), reduce)
        later = (gather("forward", params, node, units), gather("backward", params, node, units), reduce)
        boundary = ()
    trainable_shard = params / world
    return StepWork(micro_batch=decoder_micro_batch(model, seq_len, micro_batch, checkpointing),
                    micro_batches=accumulation, first=first, later=later, edges=edges, boundary=boundary,
                    trainable_shard=trainable_shard,
                    saved_bytes=(SAVED_BYTES_ALL + SAVED_BYTES_TRAINABLE) * params / world)
