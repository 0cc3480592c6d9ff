"""examples/slurm/pretrain_gpt_mtp.sbatch submitted to a real single-node Slurm cluster (CPU, gloo).

The module fixture installs Debian's slurm-wlm and munge when missing (root + apt-get; skipped otherwise),
starts munged, slurmctld and slurmd, and stops them after the module. Each launch mode of the script (torchrun
with the static or the c10d rendezvous, one srun task per rank) runs the real pretraining (`-m megatron_mtp.pretrain`)
on 2 processes at TP=2 for 2 iterations and saves a checkpoint. The losses and gradient norms it logs must equal,
bit for bit, those of the same run started directly with torchrun, outside Slurm.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from slurm_cluster import SlurmCluster, SlurmUnavailable, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "pretrain_gpt_mtp.sbatch"
JOB_TIMEOUT = 600
NPROC = 2
ITERS = 2

TINY_GPT = [
    "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mtp-num-layers", "1",
    "--lr-warmup-iters", "1", "--tokenizer-type", "ByteLevel", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", "0",
]
LOGGED = ("lm_loss", "mtp_1_loss", "mtp_1_acc", "grad_norm")


def outputs(directory: Path):
    """Flags that send the run's checkpoint and JSON log into ``directory``."""
    return ["--save", str(directory / "ckpt"), "--json-log", str(directory / "log.jsonl")]


def logged(directory: Path) -> dict:
    """{iteration: {metric: value}} of the training steps in the run's JSON log."""
    with open(directory / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: {k: r[k] for k in LOGGED} for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    """The same training started with torchrun in this process's environment: the reference."""
    directory = tmp_path_factory.mktemp("direct")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={NPROC}",
               f"--master-port={free_port()}", "-m", "megatron_mtp.pretrain", *TINY_GPT, *outputs(directory)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the sbatch script's thread count
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return logged(directory)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, request):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(cluster.stop)  # registered first: a half-started cluster is stopped too
    try:
        cluster.start()  # installs slurm-wlm and munge first when slurmctld is missing
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    print("\n[slurm] " + ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items()))
    return cluster


def job_env(**extra):
    """What the test exports to the job through sbatch: this interpreter, 2 ranks on the node, a free port."""
    env = {"PYTHON": sys.executable, "MTP_ROOT": str(REPO), "NPROC_PER_NODE": str(NPROC),
           "MASTER_PORT": str(free_port())}
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:  # the node name from the job's node list does not resolve here
        env["MASTER_ADDR"] = "127.0.0.1"
    env.update(extra)
    return env


def run_job(cluster, name, args, env):
    # No GPUs on the test node: cancel the script's --gpus-per-node=8, one node only.
    job_id = cluster.submit(SBATCH, args, env=env, cwd=REPO,
                            sbatch_options=[f"--job-name={name}", "--nodes=1", "--gpus-per-node=0", "--time=15"])
    job = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    print(f"[slurm] job {job.job_id} {name}: {job.state} exit {job.exit_code} in {job.seconds:.1f}s")
    return job


@pytest.mark.parametrize("launcher,rdzv", [("torchrun", "static"), ("torchrun", "c10d"), ("srun", "static")])
def test_sbatch_launch_modes_train_like_a_direct_run(slurm, direct_run, tmp_path, launcher, rdzv):
    # The model flags through PRETRAIN_ARGS, the output paths as the script's own arguments: both ways in.
    env = job_env(LAUNCHER=launcher, RDZV_BACKEND=rdzv, PRETRAIN_ARGS=" ".join(TINY_GPT))
    job = run_job(slurm, f"mtp-{launcher}-{rdzv}", outputs(tmp_path), env)
    report = f"job {job.job_id}: state {job.state}, exit {job.exit_code}\n---- job output ----\n{job.output}"
    assert job.succeeded, report
    assert f"launcher={launcher}" in job.output and f"world {NPROC} (TP 2, PP 1, DP 1)" in job.output, report

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(ITERS), report
    common = torch.load(ckpt / f"iter_{ITERS:07d}" / "common.pt", weights_only=False)
    assert (common["iteration"], common["train_state"]) == (ITERS, {"consumed_samples": ITERS * 4}), common
    assert (ckpt / f"iter_{ITERS:07d}" / ".metadata").is_file(), report

    assert sorted(direct_run) == list(range(1, ITERS + 1)), direct_run
    assert logged(tmp_path) == direct_run, report
