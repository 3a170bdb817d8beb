"""`python -m pipeline.planning predict`: the calibrated step-time model for any dense decoder on any planned cluster.

    python -m pipeline.planning predict --layers 32 --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256 \
        --seq-len 8192 --micro-batch 1 --grad-accum 1 --gpus 64 --gpu a100-80g --sharding zero3 \
        --checkpointing selective [--nics-per-node 8 --nic-gbps 200] [--measured bench.json] [--json]

Prints tokens/s per GPU, MFU and step time, each as a central value and a range (`--json`: one JSON object with
`tokens_per_s_per_gpu`, `mfu` and `step_s`, each {"low", "mid", "high"}, and which figures were measured).

    python -m pipeline.planning plan --measured bench.json --stage 2 --model 7b --nodes 32 --gpu a100-80g

The dry run's report (the same flags as `--dry-run`) with a measured compute rate in place of the modelled one.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import resolve
from pipeline.planning.collectives import cluster_for
from pipeline.planning.decoder import CHECKPOINTING, MLPS, SHARDINGS, Decoder, decoder_step
from pipeline.planning.dry_run import dry_run
from pipeline.planning.hardware import GPUS
from pipeline.planning.measured import measured_from
from pipeline.planning.report import cluster_line
from pipeline.planning.step_time import Operations, Prediction, predict


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.planning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("predict", help="tokens/s, MFU and step time of a dense decoder on a cluster")
    model = q.add_argument_group("model")
    model.add_argument("--layers", type=int, required=True)
    model.add_argument("--hidden", type=int, required=True)
    model.add_argument("--heads", type=int, required=True)
    model.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads, no GQA)")
    model.add_argument("--ffn", type=int, required=True, help="MLP width")
    model.add_argument("--mlp", choices=MLPS, default="swiglu")
    model.add_argument("--vocab", type=int, required=True)
    model.add_argument("--tied-embeddings", action="store_true", help="the LM head is the embedding matrix")
    run = q.add_argument_group("run")
    run.add_argument("--seq-len", type=int, required=True)
    run.add_argument("--micro-batch", type=int, required=True, help="sequences per GPU per micro-batch")
    run.add_argument("--grad-accum", type=int, default=1)
    run.add_argument("--sharding", choices=SHARDINGS, default="zero3")
    run.add_argument("--checkpointing", choices=CHECKPOINTING, default="none")
    run.add_argument("--param-bytes", type=int, default=2, help="bytes per gathered parameter (4: fp32 FSDP params)")
    run.add_argument("--grad-bytes", type=int, default=2, help="bytes per reduced gradient (4: fp32 reduction)")
    run.add_argument("--save-every", type=int, help="steps between checkpoints (default: no saves)")
    run.add_argument("--loader-tokens-per-s", type=float, help="one rank's data loader (bench/loader.py)")
    cluster = q.add_argument_group("cluster (network figures default from --gpu's typical node)")
    cluster.add_argument("--gpus", type=int, required=True)
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu", choices=list(GPUS), default="a100-80g")
    cluster.add_argument("--nics-per-node", type=int)
    cluster.add_argument("--nic-gbps", type=float, help="Gb/s per NIC")
    cluster.add_argument("--nvlink-gbps", type=float, help="NCCL bus bandwidth inside a node, Gb/s")
    q.add_argument("--measured", help="bench/train_step.py --json output from a GPU run: its compute rate replaces "
                                      "the assumed one for that GPU type and width")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    plan = sub.add_parser("plan", help="the dry run's report with a measured compute rate; the other flags are "
                                       "--dry-run's (--stage, --model, --nodes, --gpu, ...)")
    plan.add_argument("--measured", required=True, help="bench/train_step.py --json output from a GPU run")
    return p


def prediction_of(args: argparse.Namespace) -> tuple[Prediction, str]:
    """The prediction for the parsed flags, and the line naming the cluster."""
    per_node = min(args.gpus_per_node, args.gpus)
    if args.gpus % per_node:
        raise ValueError(f"--gpus {args.gpus} is not a whole number of nodes of {per_node}")
    cluster = cluster_for(args.gpu, args.gpus // per_node, per_node, args.nics_per_node, args.nic_gbps,
                          args.nvlink_gbps)
    model = Decoder(args.layers, args.hidden, args.heads, args.kv_heads or args.heads, args.ffn, args.mlp, args.vocab,
                    args.tied_embeddings)
    work = decoder_step(model, args.seq_len, args.micro_batch, args.grad_accum, cluster, args.sharding,
                        args.checkpointing, args.param_bytes, args.grad_bytes)
    ops = Operations(save_every=args.save_every, loader_tokens_per_s=args.loader_tokens_per_s)
    measured = measured_from(args.measured) if args.measured else None
    return predict(work, cluster, ops, args.hidden, measured), cluster_line(cluster)


def format_prediction(prediction: Prediction, cluster: str) -> str:
    figures = prediction.as_dict()
    mid = prediction.mid

    def line(label: str, key: str, fmt: str) -> str:
        f = figures[key]
        return f"  {label:<18} {f['mid']:{fmt}}  ({f['low']:{fmt}} - {f['high']:{fmt}})"

    return "\n".join([
        f"Predicted on {cluster}:",
        line("tokens/s per GPU", "tokens_per_s_per_gpu", ",.0f"),
        line("MFU", "mfu", ".1%"),
        line("step s", "step_s", ".3f"),
        f"  per step: compute {mid.compute_s:.3f} s (with NCCL's contention), communication {mid.comm_s:.3f} s of "
        f"which {mid.exposed_s:.3f} s exposed, optimizer {mid.optimizer_s:.3f} s, saves {mid.save_s:.3f} s, "
        f"data loader {mid.loader_s:.3f} s",
        f"  measured: {', '.join(figures['measured']) or 'nothing'}; modelled: {', '.join(figures['modelled'])}"])


def planned_with(measured_path: str, train_flags: list[str]) -> str:
    """The dry run's report for `train_flags`, its compute rate measured."""
    config, args = resolve(None, train_flags)
    return dry_run(config, args.cluster, args.model_config, measured_from(measured_path))


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    try:
        if args.command == "plan":
            print(planned_with(args.measured, rest))
            return 0
        if rest:
            raise ValueError(f"unknown flags: {' '.join(rest)}")
        prediction, cluster = prediction_of(args)
    except ValueError as error:  # ConfigError is one
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(prediction.as_dict()) if args.json else format_prediction(prediction, cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
