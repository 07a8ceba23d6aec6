"""A real two-node Slurm cluster on this host, for the cluster tests (no mocks).

munged, slurmctld and two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`) run in the
foreground as children of this process, each with its own port, spool, log and pid file under
one private directory, so nothing system-wide (/etc/slurm, /run/munge) is read or touched.
The nodes have distinct loopback addresses, NodeAddr=127.0.0.2 and 127.0.0.3: every daemon
and every job talks on 127.0.0.0/8 only. `stop()` ends every job, then every daemon by pid.

Debian's slurm-wlm and munge must be installed (`slurm/ci/install.sh`, run by
`make test-cluster`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}
CTLD_ADDR = "127.0.0.1"
PARTITION = "ci"
CPUS_PER_NODE = 2
"""Slurm CPUs per node; the host has 2 cores, `config_overrides` lets each node claim 2."""


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _conf(root: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeAddr={a} NodeHostname={socket.gethostname()} Port={node_ports[n]} "
        f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN" for n, a in NODES.items())
    return f"""\
ClusterName=gadci
SlurmctldHost={socket.gethostname()}({CTLD_ADDR})
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default
# 120 s); shortened so that the preemption test's requeued job restarts within seconds.
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track a step's processes by their parent chain.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# The nodes claim the CPUs written here, not the host's count.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to `scontrol show job` for the tests.
MinJobAge=600
KillWait=10
MessageTimeout=20
SlurmdTimeout=120
InactiveLimit=0
PropagateResourceLimits=NONE
{nodes}
PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=30 State=UP
"""


class LocalSlurm:
    """The cluster under `root`; `env` is the environment every Slurm client call needs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    # ---- start / stop ------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        for sub in ("munge", "ctld", "run", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)  # munged refuses a socket dir others can write
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ports = {n: free_port() for n in NODES}
        (self.root / "slurm.conf").write_text(_conf(self.root, free_port(), ports))
        try:
            m = self.root / "munge"
            self._spawn("munged", ["munged", "--foreground", "--force",
                                   f"--socket={m}/munge.socket", f"--key-file={key}",
                                   f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                                   f"--seed-file={m}/munged.seed"])
            self._wait(lambda: (m / "munge.socket").exists(), timeout_s, "munged socket")
            conf = str(self.root / "slurm.conf")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", conf])
            self._wait(lambda: self.scontrol("ping").returncode == 0, timeout_s,
                       "slurmctld to answer")
            for n in NODES:
                self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", conf])
            self._wait(self.nodes_idle, timeout_s, "both nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"slurm daemon(s) exited while waiting for {what}: {dead}\n"
                                   + self.logs_tail())
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout_s:g}s waiting for {what}\n"
                           + self.logs_tail())

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop each daemon by its pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", f"--partition={PARTITION}"], env=self.env,
                           capture_output=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.squeue_ids():
                time.sleep(0.5)
        # Nodes first, then the controller, then munged (the others authenticate through it).
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs = {}

    def alive(self) -> dict[str, int]:
        """Daemon name -> pid, of those still running."""
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    # ---- clients -----------------------------------------------------------------------

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**self.env, **kw.pop("env", {})},
                              capture_output=True, text=True, **kw)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args])

    def nodes_idle(self) -> bool:
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %t"])
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return all(states.get(n, "").startswith("idle") for n in NODES)

    def squeue_ids(self) -> list[str]:
        res = self.run(["squeue", "-h", "-o", "%i"])
        return res.stdout.split()

    def sbatch(self, argv: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        res = self.run(["sbatch", "--parsable", *argv], env=env or {}, cwd=cwd)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr}")
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        text = self.scontrol("show", "job", "-o", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout_s: float, done=("COMPLETED", "FAILED",
                 "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env, capture_output=True)
        raise AssertionError(f"job {job_id} not done within {timeout_s:g}s: {info}")


def job_processes(job_id: str) -> list[tuple[int, str, str]]:
    """(pid, SLURMD_NODENAME, command) of every process on this host that belongs to a job,
    found by the SLURM_JOB_ID in its environment (Ray's workers inherit it from the raylet).
    Slurm's own slurmstepd is not counted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() not in env or cmd.startswith("slurmstepd"):
            continue
        node = next((e.split(b"=", 1)[1].decode() for e in env
                     if e.startswith(b"SLURMD_NODENAME=")), "")
        found.append((int(entry.name), node, cmd.strip()))
    return found


def have_slurm() -> bool:
    return all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun"))
