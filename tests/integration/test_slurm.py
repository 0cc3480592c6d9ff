"""examples/slurm/pretrain_gpt_mtp.sbatch submitted to a real single-node Slurm cluster (CPU, gloo).

The module fixture installs Debian's slurm-wlm and munge when missing (root + apt-get; skipped otherwise),
starts munged, slurmctld and slurmd, and stops them after the module. The jobs run 2 processes on one node:
- the real pretraining (`-m megatron_mtp.pretrain`, TP=2, 4 iterations, checkpoint at iteration 4);
- a small rendezvous program for each launch mode of the script (torchrun static / c10d, one srun task per rank)
  that all-reduces across the ranks and writes the same output lines and checkpoint markers.
"""

import socket
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from slurm_cluster import SlurmCluster, SlurmUnavailable, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "pretrain_gpt_mtp.sbatch"
JOB_TIMEOUT = 600
NPROC = 2

TINY_GPT = [
    "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mtp-num-layers", "1",
    "--lr-warmup-iters", "1",  # the trainer's default warm-up (20) must be shorter than the 4 iterations
    "--train-iters", "4", "--save-interval", "4", "--log-interval", "1",
]

# Stands in for the trainer's launch contract: ranks from the environment, one collective, the trainer's output
# lines from the last rank, Megatron-style checkpoint markers from rank 0.
RENDEZVOUS_PROGRAM = textwrap.dedent('''\
    import argparse, os, socket
    import torch
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--save", required=True)
    parser.add_argument("--train-iters", type=int, required=True)
    args, _ = parser.parse_known_args()
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    assert rank == int(os.environ["RANK"]) and world == int(os.environ["WORLD_SIZE"])
    print(f"rank {rank}/{world} local_rank {os.environ['LOCAL_RANK']} on {socket.gethostname()}", flush=True)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    assert total.item() == world * (world + 1) / 2, total
    iteration = args.train_iters
    if rank == 0:
        os.makedirs(os.path.join(args.save, f"iter_{iteration:07d}"), exist_ok=True)
        with open(os.path.join(args.save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    if rank == world - 1:
        print(f"iteration {iteration}/{args.train_iters} | all-reduce sum {total.item():g} | world {world}", flush=True)
        print(f"saved checkpoint at iteration {iteration} to {args.save}", flush=True)
    dist.destroy_process_group()
''')


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


def assert_trained_and_saved(job, ckpt: Path, iters: int = 4):
    report = f"job {job.job_id}: state {job.state}, exit {job.exit_code}\n---- job output ----\n{job.output}"
    assert job.succeeded, report
    lines = job.output.splitlines()
    assert any(line.startswith(f"iteration {iters}/{iters}") for line in lines), report
    assert f"saved checkpoint at iteration {iters}" in job.output, report
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters), report
    assert (ckpt / f"iter_{iters:07d}").is_dir(), report


def test_sbatch_pretrain_tp2_cpu(slurm, tmp_path):
    ckpt = tmp_path / "ckpt"
    job = run_job(slurm, "mtp-pretrain", [*TINY_GPT, "--save", str(ckpt)], job_env())
    assert_trained_and_saved(job, ckpt)


@pytest.mark.parametrize("launcher,rdzv", [("torchrun", "static"), ("torchrun", "c10d"), ("srun", "static")])
def test_sbatch_launch_modes_rendezvous(slurm, tmp_path, launcher, rdzv):
    program = tmp_path / "rendezvous.py"
    program.write_text(RENDEZVOUS_PROGRAM)
    ckpt = tmp_path / "ckpt"
    env = job_env(PRETRAIN_SCRIPT=str(program), LAUNCHER=launcher, RDZV_BACKEND=rdzv,
                  PRETRAIN_ARGS=f"--train-iters 4 --save {ckpt}")
    job = run_job(slurm, f"rdzv-{launcher}-{rdzv}", [], env)
    assert_trained_and_saved(job, ckpt)
    assert job.output.count(f"/{NPROC} local_rank") == NPROC, job.output
