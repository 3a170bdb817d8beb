"""A real one-node Slurm on localhost for tests: private munged, slurmctld and slurmd under one temp dir.

Everything is private so it can run beside anything else on the machine: its own munge key and socket, its own
slurm.conf (reached through SLURM_CONF, which every Slurm command and daemon reads), free ports, state and spool
under the temp dir. `stop()` signals only the daemons it started (by the pids it holds); it never calls
`scontrol shutdown` against a controller it did not start, nor `pkill`.

Needs root (slurmd runs jobs as their user; munged is forced to run as root) and Debian's `slurm-wlm` and
`munge` packages: `ensure_installed()` installs them with apt-get when they are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO, free_ports

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the tests skip with this reason)."""


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def ensure_installed(timeout: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get if any daemon or client is missing (needs root and apt)."""
    if all(_sbin(n) for n in DAEMONS + CLIENTS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge missing and not root with apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {(done.stdout + done.stderr)[-2000:]}")
    missing = [n for n in DAEMONS + CLIENTS if not _sbin(n)]
    if missing:
        raise SlurmUnavailable(f"installed slurm-wlm and munge but {missing} still missing")


@dataclass
class LocalSlurm:
    """One node named `localhost`, one partition `debug`; `env` is what a client (sbatch, srun...) needs."""

    root: Path
    cpus: int
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    partition: str = "debug"

    def path(self, name: str) -> Path:
        return self.root / name

    def write_config(self) -> Path:
        ctld_port, slurmd_port = free_ports(2)
        conf = f"""\
# Written by tests/slurm_harness.py: one node, this machine, everything under {self.root}.
ClusterName=janustest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.path('munge.socket')},cred_expire=10
StateSaveLocation={self.path('state')}
SlurmdSpoolDir={self.path('spool')}
SlurmctldPidFile={self.path('slurmctld.pid')}
SlurmdPidFile={self.path('slurmd.pid')}
SlurmctldLogFile={self.path('slurmctld.log')}
SlurmdLogFile={self.path('slurmd.log')}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60): a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# The sbatch scripts requeue themselves with `scontrol requeue`; finished jobs stay visible for 5 minutes.
JobRequeue=1
MinJobAge=300
ReturnToService=2
# The node declares at least 2 CPUs (two CPU ranks) even on a 1-core machine: trust slurm.conf, not the probe.
SlurmdParameters=config_overrides
KillWait=10
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        for d in ("state", "spool", "munge"):
            self.path(d).mkdir(parents=True, exist_ok=True)
        path = self.path("slurm.conf")
        path.write_text(conf)
        return path

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.path(f"{name}.out"), "wb")  # noqa: SIM115 - the daemon keeps it; closed with the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> None:
        self.path("munge").mkdir(parents=True, exist_ok=True)
        key = self.path("munge/munge.key")
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        conf = self.write_config()
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            self.env.pop(k)  # a test run inside a Slurm job must not leak that job's settings
        self._start("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={self.path('munge.socket')}",
                               f"--key-file={key}", f"--pid-file={self.path('munge/munged.pid')}",
                               f"--log-file={self.path('munge/munged.log')}",
                               f"--seed-file={self.path('munge/munged.seed')}"])
        self._wait(lambda: self.path("munge.socket").exists(), timeout, "munged socket")
        self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, timeout,
                   "slurmctld answering scontrol ping")
        self._start("slurmd", [_sbin("slurmd"), "-D", "-N", "localhost", "-f", str(conf)])
        self._wait(lambda: self.node_state() == "idle", timeout,
                   "node localhost idle in sinfo")

    def node_state(self) -> str:
        done = self.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], check=False)
        return done.stdout.strip()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        done = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        fields = {}
        for item in done.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "munged.out", "slurmctld.out", "slurmd.out"):
            p = self.path(name)
            if p.exists() and p.stat().st_size:
                out.append(f"--- {name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons this harness started (slurmd first), by their pids, after cancelling this private
        cluster's jobs (SLURM_CONF points scancel at our controller only) so no job step outlives slurmd."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", "root"], check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def start_local_slurm(root: Path | None = None) -> LocalSlurm:
    """Install if needed, then start; raises SlurmUnavailable (with the daemons' logs) when it cannot."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a private slurmd must run as root")
    ensure_installed()
    root = Path(root or tempfile.mkdtemp(prefix="slurmjp", dir="/tmp"))
    slurm = LocalSlurm(root=root, cpus=max(2, os.cpu_count() or 1))
    try:
        slurm.start()
    except BaseException:
        slurm.stop()
        raise
    return slurm


# The sbatch scripts under test.
SCRIPTS = REPO / "launchers" / "slurm"


# Knobs a developer's shell may hold: every job here sets its own.
KNOBS = ("DATA", "INIT", "MODEL", "TOKENIZER", "OUTPUT", "SAVE_EVERY", "CONFIG", "EXTRA_ARGS", "TASK", "INPUT",
         "MAX_RESTARTS", "JANUS_REFUSED_DIR", "RANKS_PER_NODE", "CPUS_PER_TASK", "MASTER_ADDR", "MASTER_PORT",
         "EXTRA_SRUN_ARGS", "PYTHON", "CHECKPOINT", "EXPORT_OUT", "LAYOUT", "STEP")
