"""Peak host memory of the heads' loss, forward and backward: every target at once against bounded chunks.

    python bench/loss_memory.py [--tokens 8192] [--vocab 102400] [--hidden 256] [--json out.json]

A flat 2 x 4096-token all-text micro-batch has 8,192 targets of the 102,400-wide LM head. The loss the forward
used to compute (`head(hidden).float()` -> cross-entropy over all of them at once) holds 3.4 GB of fp32 logits and
the log-softmax cross-entropy saves, then their gradients in the backward; `model.head_loss.head_loss` takes
the targets `LOGITS_CHUNK_BYTES` of logits at a time and recomputes each chunk's logits in the backward.

Each variant runs in a fresh process (so one's freed memory cannot hide the other's peak) on a synthetic fp32
Linear head; the process reports its peak resident set (`ru_maxrss`) less its resident set just before the
loss, i.e. what the loss's forward and backward added: logits and their gradients, plus the head's weight
gradient (vocab x hidden x 4 B, the same in both). Large tensors come from mmap, so freed ones leave the
resident set and the peak is what was alive at once. The hidden width only sets the matmuls' cost and the weight
(logits do not depend on it): the default 256 keeps a 2-core run to about a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

VARIANTS = ("one_pass", "chunked")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(variant: str, tokens: int, vocab: int, hidden: int) -> dict:
    """In this process: one forward and backward of the loss; the memory it added and its time."""
    import torch
    import torch.nn.functional as F

    from model.head_loss import LOGITS_CHUNK_BYTES, chunk_targets, head_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    x = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    before = rss_bytes()
    start = time.perf_counter()
    if variant == "one_pass":
        loss = F.cross_entropy(head(x).float(), targets, reduction="none")
    else:
        loss = head_loss(head, x, targets, vocab, max_targets=tokens)  # every position a target: all text
    loss.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": variant, "tokens": tokens, "vocab": vocab, "hidden": hidden,
            "chunks": math.ceil(tokens / chunk_targets(vocab)) if variant == "chunked" else 1,
            "logits_chunk_bytes": LOGITS_CHUNK_BYTES, "peak_added_bytes": peak - before,
            "weight_grad_bytes": 4 * vocab * hidden, "fp32_logits_bytes": 4 * tokens * vocab,
            "seconds": round(seconds, 2), "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=102_400)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab, args.hidden)))
        return
    results = []
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab), "--hidden", str(args.hidden)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{variant:9s} peak added {r['peak_added_bytes'] / 2**30:6.2f} GiB "
              f"(of which the weight's gradient {r['weight_grad_bytes'] / 2**30:.2f} GiB), "
              f"{r['chunks']} chunk(s) of <= {math.ceil(r['tokens'] / r['chunks'])} targets, {r['seconds']:.1f} s",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
