"""A real single-node SLURM cluster on localhost, for tests (recipe: shared/notes/slurm-local.md).

Everything lives in one temp dir: munge key and socket, slurm.conf, gres.conf, state, spool, logs, jobcomp.txt.
The node is declared bigger than the machine (``SlurmdParameters=config_overrides``) and with two fake GPUs, so
the sbatch scripts' site lines (``--gres=gpu:1``, ``--mem=64G``, ``--cpus-per-task=8``, ``--time=48:00:00``) are
accepted unmodified. Nothing is enforced (no cgroups), so over-declaring is harmless.

Usage::

    reason = ensure_slurm()            # None when usable, else why not
    with SlurmCluster(tmp_dir) as c:    # started and idle, stopped on exit (also on error)
        job = c.sbatch(["script.sh"], env=..., cwd=...)
        final = c.wait(job)             # {"1": "COMPLETED"} per task
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}

# The fake node: 16 CPUs, ~250 GiB, 4 GPUs. Big enough for the seed's requests and for 4 capture tasks at once.
NODE_CPUS = 16
NODE_MEMORY_MB = 256000
NODE_GPUS = 4


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (Path(d) / name).exists()), None
    )


def missing_tools() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _which(name) is None]


def ensure_slurm(install: bool = True) -> str | None:
    """Make the SLURM daemons and clients available. Returns None when they are, else the reason they are not.

    Installs Debian's packages (no recommends, ~9 s) when missing and we are root with apt-get.
    """
    missing = missing_tools()
    if not missing:
        return None
    if not install:
        return f"SLURM tools not installed: {', '.join(missing)}"
    if os.geteuid() != 0:
        return f"SLURM tools not installed ({', '.join(missing)}) and not root, so cannot apt-get install them"
    if shutil.which("apt-get") is None:
        return f"SLURM tools not installed ({', '.join(missing)}) and no apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]]
    for cmd in steps:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd)}` failed (rc {proc.returncode}): {' | '.join(tail)}"
    missing = missing_tools()
    if missing:
        return f"still missing after apt-get install: {', '.join(missing)}"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is "alive" for kill(0); look at /proc to tell
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ClusterError(RuntimeError):
    pass


@dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: str
    restarts: int
    reason: str
    raw: dict[str, str]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = NODE_CPUS, memory_mb: int = NODE_MEMORY_MB, gpus: int = NODE_GPUS):
        self.root = Path(root)
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.conf = self.root / "etc" / "slurm.conf"
        # munged requires execute-for-all on every parent of its socket; pytest's and mkdtemp's dirs are 0700,
        # so the munge dir is its own 0755 dir under the system temp dir (removed by stop()).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="sae-slurm-munge-"))
        self.munge_sock = self.munge_dir / "munge.sock"
        self.log_dir = self.root / "log"
        self.jobcomp = self.log_dir / "jobcomp.txt"
        self.started = False

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and, through --export=ALL, for jobs)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self, ctld_port: int, slurmd_port: int) -> None:
        r = self.root
        gpu_files = []
        for i in range(self.gpus):
            f = r / "dev" / f"fakegpu{i}"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
            gpu_files.append(str(f))
        (r / "etc" / "gres.conf").write_text("".join(f"NodeName=localhost Name=gpu File={f}\n" for f in gpu_files))
        self.conf.write_text(f"""\
ClusterName=saetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_sock},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
MinJobAge=600
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60.0) -> None:
        for d in ("etc", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o755)  # munged refuses a socket dir without execute for all
        key = self.munge_dir / "munge.key"
        if not key.exists():
            self._check([_which("mungekey"), "-c", "-k", str(key)])
        self._check(
            [
                _which("munged"),
                f"--key-file={key}",
                f"--socket={self.munge_sock}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ]
        )
        self.started = True
        self._write_config(free_port(), free_port())
        self._check([_which("slurmctld"), "-f", str(self.conf)])
        self._check([_which("slurmd"), "-f", str(self.conf), "-N", "localhost"])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                pid = self._pid(name)
                if pid is None or not _pid_alive(pid):
                    # daemon mode returns 0 even when the daemon dies right after forking
                    if time.monotonic() > deadline - timeout + 5:
                        raise ClusterError(f"{name} is not running; last log lines:\n{self.log_tail(name)}")
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-n", "localhost", "-o", "%t"], env=self.env, capture_output=True, text=True
            )
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise ClusterError(
            f"node not idle after {timeout:.0f} s (state {state!r}); slurmctld log:\n"
            f"{self.log_tail('slurmctld')}\nslurmd log:\n{self.log_tail('slurmd')}"
        )

    def _check(self, cmd: list[str | None]) -> None:
        if cmd[0] is None:
            raise ClusterError(f"command not found for {cmd}")
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=self.env, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(map(str, cmd))} failed (rc {proc.returncode}): {proc.stderr.strip()}")

    def _pid(self, name: str) -> int | None:
        path = self.munge_dir / "munged.pid" if name == "munged" else self.root / "run" / f"{name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {path})"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemons of this cluster only (by their pid files), then munged. Safe to call twice."""
        if not self.started and not (self.root / "run").exists():
            return
        pids = {n: self._pid(n) for n in ("slurmctld", "slurmd")}
        if self.conf.exists() and any(p and _pid_alive(p) for p in pids.values()):
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p and _pid_alive(p) for p in pids.values()):
            time.sleep(0.2)
        # leftovers: job processes of a killed slurmd are not ours to hunt by name; the daemons are
        for pid in pids.values():
            if pid and _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        munged = self._pid("munged")
        if munged and _pid_alive(munged):
            os.kill(munged, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _pid_alive(munged):
                time.sleep(0.1)
        shutil.rmtree(self.munge_dir, ignore_errors=True)
        self.started = False

    # ---------------------------------------------------------------- jobs
    def run(
        self,
        cmd: list[str],
        cwd: Path | str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        full_env = dict(env) if env is not None else dict(os.environ)
        full_env["SLURM_CONF"] = str(self.conf)
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], cwd: Path | str | None = None, env: dict[str, str] | None = None) -> str:
        """Submit (``--parsable``) and return the job id."""
        proc = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[JobInfo]:
        """scontrol's view of a job (one entry per task for an array), [] once purged."""
        proc = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        jobs = []
        for line in proc.stdout.splitlines():
            raw = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
            if "JobId" not in raw:
                continue
            ident = raw["JobId"]
            if raw.get("ArrayJobId") and raw.get("ArrayTaskId"):
                ident = f"{raw['ArrayJobId']}_{raw['ArrayTaskId']}"
            jobs.append(
                JobInfo(
                    ident,
                    raw.get("JobState", ""),
                    raw.get("ExitCode", ""),
                    int(raw.get("Restarts", "0") or 0),
                    raw.get("Reason", ""),
                    raw,
                )
            )
        return jobs

    def states(self, job_id: str) -> dict[str, str]:
        """Job (or task) id → state, every task of an array listed separately (squeue -r)."""
        proc = self.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T"], check=False)
        out = {}
        for line in proc.stdout.splitlines():
            if "|" in line:
                ident, state = line.strip().split("|", 1)
                out[ident] = state
        return out

    def wait(
        self, job_ids: str | list[str], timeout: float = 300, poll: float = 1.0, expect_tasks: int | None = None
    ) -> dict[str, JobInfo]:
        """Poll until every job (and array task) is in a final state; return id → JobInfo.

        A requeued job passes through PENDING again, so only a terminal state counts. ``expect_tasks``: wait until
        that many tasks are known (an array's pending tasks are first shown as one record).
        """
        ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        deadline = time.monotonic() + timeout
        last: dict[str, JobInfo] = {}
        while True:
            last = {}
            for jid in ids:
                for info in self.job(jid):
                    last[info.job_id] = info
            done = bool(last) and all(i.state in TERMINAL_STATES for i in last.values())
            if expect_tasks is not None and len(last) < expect_tasks:
                done = False
            if done:
                return last
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"jobs {ids} not finished after {timeout:.0f} s: "
                    f"{ {k: (v.state, v.reason) for k, v in last.items()} }\n"
                    f"slurmctld log:\n{self.log_tail('slurmctld')}"
                )
            time.sleep(poll)

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120, poll: float = 0.5) -> JobInfo:
        deadline = time.monotonic() + timeout
        while True:
            infos = self.job(job_id)
            for info in infos:
                if info.state in states:
                    return info
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} never reached {states}: {[(i.state, i.reason) for i in infos]}")
            time.sleep(poll)

    def jobcomp_records(self, job_id: str | None = None) -> list[dict[str, str]]:
        """Lines of jobcomp.txt (one per job end, and one per requeue) as dicts, optionally for one JobId."""
        try:
            text = self.jobcomp.read_text(errors="replace")
        except OSError:
            return []
        recs = []
        for line in text.splitlines():
            raw = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
            if job_id is None or raw.get("JobId") == str(job_id):
                recs.append(raw)
        return recs
