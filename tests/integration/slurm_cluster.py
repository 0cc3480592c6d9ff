"""A real single-node Slurm cluster for integration tests (Debian's slurm-wlm + munge, run as root).

    cluster = SlurmCluster(tmp_dir).start()     # munged (if not already serving), slurmctld, slurmd; waits for idle
    job_id = cluster.submit("examples/slurm/pretrain_gpt_mtp.sbatch", ["--train-iters", "4"],
                            sbatch_options=["--nodes=1"], env={"NPROC_PER_NODE": "2"})
    job = cluster.wait(job_id, timeout=600)     # polls scontrol until the job has finished
    assert job.succeeded, job.output
    cluster.stop()                              # scancel leftovers, stop only the daemons started here

`ensure_slurm_installed()` installs the packages with apt-get when `slurmctld` is missing. All Slurm state, spool,
log and pid files live under the given directory; the configuration is passed with `-f` to the daemons and with
`SLURM_CONF` to the client commands, so a system-wide `/etc/slurm` is neither needed nor touched. munge has no such
switch for its key and socket: it uses the system paths (/etc/munge, /run/munge), as the client library expects.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE",
}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (not root, no apt-get)."""


def find_program(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin directories a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def ensure_slurm_installed(timeout: float = 900) -> float:
    """Install slurm-wlm and munge with apt-get when `slurmctld` is missing.

    Returns:
        seconds spent installing (0.0 when already installed).
    Raises:
        SlurmUnavailable: not installed and not installable (not root or no apt-get).
        RuntimeError: apt-get failed (its output in the message).
    """
    if all(find_program(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return 0.0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurmctld is missing and cannot be installed (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid_file(pid_file: Path, timeout: float = 20.0) -> None:
    """SIGTERM the process named in `pid_file`, SIGKILL it if it outlives `timeout`."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def _munge_works() -> bool:
    munge, unmunge = find_program("munge"), find_program("unmunge")
    if not (munge and unmunge):
        return False
    cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
    if cred.returncode != 0:
        return False
    return subprocess.run([unmunge], input=cred.stdout, capture_output=True, timeout=10).returncode == 0


@dataclasses.dataclass
class Munge:
    """munged on its default key and socket, started as the `munge` user unless one already answers."""

    key_file: Path = Path("/etc/munge/munge.key")
    pid_file: Path = Path("/run/munge/munged.pid")
    started: bool = False

    def start(self, timeout: float = 20.0) -> None:
        if _munge_works():
            return  # someone else's munged serves us; leave it alone
        user = pwd.getpwnam("munge")
        for d, mode in (("/etc/munge", 0o700), ("/var/lib/munge", 0o700), ("/var/log/munge", 0o700),
                        ("/run/munge", 0o755)):
            os.makedirs(d, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
            os.chmod(d, mode)
        if not self.key_file.exists():
            self.key_file.write_bytes(os.urandom(1024))
        os.chown(self.key_file, user.pw_uid, user.pw_gid)
        os.chmod(self.key_file, 0o400)
        # munged daemonises; `user=` drops root in the child before exec.
        subprocess.run([find_program("munged")], user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                       check=True, capture_output=True, timeout=timeout)
        self.started = True
        deadline = time.monotonic() + timeout
        while not _munge_works():
            if time.monotonic() > deadline:
                raise RuntimeError("munged started but `munge -n | unmunge` does not succeed")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.started:
            stop_pid_file(self.pid_file)
            self.started = False


@dataclasses.dataclass
class JobResult:
    job_id: str
    state: str          # Slurm job state, e.g. COMPLETED, FAILED, TIMEOUT
    exit_code: str      # "<exit status>:<signal>" of the batch script, e.g. "0:0"
    output: str         # the job's --output file
    seconds: float      # submission to leaving the queue

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == "0:0"


class SlurmCluster:
    """slurmctld + slurmd for this machine as one node in one default partition, state under `root`."""

    def __init__(self, root: Path, cluster_name: str = "mtp-ci"):
        self.root = Path(root)
        self.cluster_name = cluster_name
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.munge = Munge()
        self.timings: dict[str, float] = {}
        self._started: list[Path] = []  # pid files of the Slurm daemons started here
        self._submitted_at: dict[str, float] = {}

    # ---- configuration ----------------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log", "run", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        with open("/proc/meminfo") as f:
            mem_total_mib = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/integration/slurm_cluster.py
ClusterName={self.cluster_name}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Trust the configured CPUs/memory instead of draining the node over small mismatches.
SlurmdParameters=config_overrides
# Keep finished jobs visible to `scontrol show job` for an hour (there is no accounting database).
MinJobAge=3600
KillWait=10
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(mem_total_mib * 0.9)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands: this cluster's config, no Slurm variables of an outer job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; returns the completed process (text output)."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root")
        t0 = time.monotonic()
        self.timings["install"] = ensure_slurm_installed()
        t1 = time.monotonic()
        self.munge.start()
        self._write_conf()
        for daemon, pid_file in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([find_program(daemon), "-f", str(self.conf)], env=self.env, check=True,
                           capture_output=True, timeout=timeout)
            self._started.append(self.root / "run" / pid_file)
        self._wait_node_idle(timeout)
        self.timings["cluster_start"] = time.monotonic() - t1
        self.timings["install_and_start"] = time.monotonic() - t0
        return self

    def _wait_node_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            if out.returncode == 0:
                state = out.stdout.strip()
                if state.split()[-1:] == ["idle"]:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout:.0f}s (sinfo: {state!r})\n{self.logs()}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons (and munged) started by `start`."""
        if self._started:
            ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.monotonic() + 30
                while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
        for pid_file in reversed(self._started):  # slurmd first, then slurmctld
            stop_pid_file(pid_file)
        self._started.clear()
        self.munge.stop()

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"---- {path} (tail) ----\n" + "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(parts)

    # ---- jobs -------------------------------------------------------------------------------------------------
    def submit(self, script: str | Path, args: list[str] = (), *, sbatch_options: list[str] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        """`sbatch --parsable` the script with `args`; output goes to `<root>/jobs/<name>-<id>.out`.

        `env` is added to the submitting environment, which sbatch exports to the job (--export=ALL).
        Returns the job id.
        """
        cmd = ["sbatch", "--parsable", f"--output={self.root}/jobs/%x-%j.out", *sbatch_options, str(script), *args]
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        job_id = proc.stdout.strip().split(";")[0]
        self._submitted_at[job_id] = time.monotonic()
        return job_id

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...); empty if slurmctld did not answer
        (busy: it drops or delays queries on a loaded machine) or has forgotten the job (MinJobAge)."""
        try:
            out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        except subprocess.TimeoutExpired:
            return {}
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout: float = 600, poll: float = 1.0) -> JobResult:
        """Poll the job until it reaches a finished state (cancelling it after `timeout` seconds). A query that
        fails is asked again: read as the job's end, it returned a running job as finished on a busy machine."""
        start = self._submitted_at.get(job_id, time.monotonic())
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in TERMINAL_STATES:
                break
            now = time.monotonic()
            if now > deadline:
                if timed_out:
                    break  # cancelled a minute ago and still not finished: give up waiting
                timed_out = True
                self.run("scancel", job_id, check=False)
                deadline = now + 60
            time.sleep(poll)
        seconds = time.monotonic() - start
        out_path = Path(fields.get("StdOut", "")) if fields.get("StdOut") else None
        if out_path is None or not out_path.exists():
            found = sorted((self.root / "jobs").glob(f"*-{job_id}.out"))
            out_path = found[0] if found else None
        output = out_path.read_text(errors="replace") if out_path else ""
        state = "TIMEOUT (cancelled by the test)" if timed_out else fields.get("JobState", "UNKNOWN")
        return JobResult(job_id, state, fields.get("ExitCode", "?"), output, seconds)
