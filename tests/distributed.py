"""Run a script on N local CPU ranks (gloo), the way the deepspeed launcher sets them up.

Per-rank scripts live in tests/ranks/: each takes one JSON argument, prints what the test checks, and exits 0
on success. Start one with `run_ranks(rank_script(name, args))`, or `Ranks(...)` to watch it while it runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
RANK_SCRIPTS = Path(REPO) / "tests" / "ranks"


def rank_script(name: str, args: dict) -> list[str]:
    """The command line of tests/ranks/`name` with its one JSON argument."""
    path = RANK_SCRIPTS / name
    if not path.is_file():  # a missing script would otherwise surface as N rank tracebacks
        raise FileNotFoundError(path)
    return [str(path), json.dumps(args)]


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS reports free right now (bound together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class Ranks:
    """N rank processes of one job; output goes to files (a rank blocked on a full pipe would stall its peers)."""

    def __init__(self, args: list[str], world_size: int = 2, env: dict | None = None):
        port = free_port()
        self.procs, self.logs = [], []
        self.finished: list[str] | None = None  # every rank's output, kept once the job has ended
        for rank in range(world_size):
            rank_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                        **(env or {})}
            self.logs.append(tempfile.NamedTemporaryFile(mode="w+", suffix=f".rank{rank}.log"))
            self.procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=self.logs[-1],
                                               stderr=subprocess.STDOUT, text=True))

    def output(self, rank: int) -> str:
        if self.finished is not None:
            return self.finished[rank]
        return Path(self.logs[rank].name).read_text()

    def wait_for(self, rank: int, text: str, timeout: float) -> None:
        """Until `text` appears in a rank's output; fails if the job ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while text not in self.output(rank):
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"{text!r} never appeared on rank {rank}:\n{self.output(rank)[-4000:]}")
            time.sleep(0.2)

    def signal(self, rank: int, signum: int) -> None:
        self.procs[rank].send_signal(signum)

    def kill(self) -> None:
        """What a launcher does when one rank dies: kill the rest."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait(self, timeout: float) -> list[str]:
        """Every rank's output once all exit; fails on timeout or a non-zero exit."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            self.kill()
        outputs = [self.output(r) for r in range(len(self.procs))]
        self.finished = outputs
        for log in self.logs:
            log.close()
        for rank, (p, out) in enumerate(zip(self.procs, outputs, strict=True)):
            if p.returncode != 0:
                raise AssertionError(f"rank {rank} exited {p.returncode}:\n{out[-4000:]}")
        return outputs


def run_ranks(args: list[str], world_size: int = 2, timeout: float = 300, env: dict | None = None) -> list[str]:
    """Start `python args...` once per rank; return each rank's output. Fails on timeout or non-zero exit."""
    return Ranks(args, world_size, env).wait(timeout)
