"""Megatron-LM's files outside ``megatron/core`` (test data in ../shared/megatron-lm), patched and run on CPU."""

import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List

import pytest

from megatron_mtp.compat import MEGATRON_CORE_VERSION

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("MEGATRON_LM_FILES", os.path.join(REPO_ROOT, "..", "shared", "megatron-lm"))
"""Holds one folder per release; ``MEGATRON_LM_FILES`` points elsewhere (e.g. from a git worktree)."""
RELEASES = ("core_v0.16.1", "core_r0.19.0")
INSTALLED_RELEASE = "core_v0.16.1" if MEGATRON_CORE_VERSION.minor == 16 else "core_r0.19.0"
"""The Megatron-LM release matching the installed megatron-core (0.16.x or 0.19.x)."""
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_launch.py")

CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--rerun-mode", "disabled",
]
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--max-position-embeddings", "32", "--position-embedding-type", "rope", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
    "--seed", "1234", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000", "--ckpt-format", "torch_dist",
]


def megatron_lm_dir(release: str = INSTALLED_RELEASE) -> str:
    """The release's files; missing ones fail the test under CI and skip it elsewhere."""
    path = os.path.abspath(os.path.join(SHARED, release))
    if not os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
        message = f"Megatron-LM {release} files not found at {path} (the tests read them from ../shared/megatron-lm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def patched_pretrain_gpt(directory: str, release: str = INSTALLED_RELEASE) -> str:
    """A copy of the release's ``pretrain_gpt.py`` in ``directory`` with ``patches/<release>/pretrain_gpt.patch``
    applied by ``git apply``, as a user applies it; returns its path."""
    shutil.copy(os.path.join(megatron_lm_dir(release), "pretrain_gpt.py"), directory)
    patch = os.path.join(REPO_ROOT, "patches", release, "pretrain_gpt.patch")
    subprocess.run(["git", "apply", patch], cwd=directory, check=True, capture_output=True, text=True)
    return os.path.join(directory, "pretrain_gpt.py")


def run_pretrain_gpt(script: str, nproc: int, args: List[str], timeout: float = 400.0) -> str:
    """Megatron-LM's ``pretrain_gpt.py`` (``script``) under torchrun on ``nproc`` CPU processes; its stdout."""
    from conftest import free_port

    env = dict(
        os.environ,
        MEGATRON_LM_DIR=megatron_lm_dir(),
        PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        OMP_NUM_THREADS="1",
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), LAUNCHER, script, *CPU_FLAGS, *TINY_GPT, *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"pretrain_gpt.py {' '.join(args)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result.stdout


_ITERATION_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_ENTRY = re.compile(r"\s*([^|:]+?): ([-+0-9.Ee]+)\s*$")


def logged_iterations(stdout: str) -> Dict[int, Dict[str, float]]:
    """Megatron-LM's training log lines, ``{iteration: {name: value}}`` (its numbers, as printed)."""
    iterations = {}
    for line in stdout.splitlines():
        match = _ITERATION_LINE.search(line)
        if match:
            entries = (_ENTRY.match(part) for part in match.group(2).split("|"))
            iterations[int(match.group(1))] = {m.group(1): float(m.group(2)) for m in entries if m}
    return iterations


def tensorboard_scalars(directory: str) -> Dict[str, Dict[int, float]]:
    """``{tag: {step: value}}`` of the TensorBoard event files in ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(directory, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
