"""Test setup: a one-process gloo world in the pytest process, and helpers importable from every test."""

import os
import socket
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")

from megatron_mtp import cpu_bridge  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gloo_world():
    cpu_bridge.enable()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    yield


@pytest.fixture
def single_process(gloo_world):
    """Megatron parallel state for one process (TP=PP=EP=1), seeded."""
    from megatron.core import parallel_state

    _release_model_parallel_groups()
    parallel_state.initialize_model_parallel(1, 1)
    cpu_bridge.manual_seed(1234)
    yield
    _release_model_parallel_groups()


def _release_model_parallel_groups():
    """Megatron's groups destroyed, not only forgotten: each set holds about 50 gloo threads, which a suite of a few
    hundred tests would otherwise pile up in this process (thousands, busy)."""
    from megatron_mtp.training.process_groups import destroy_model_parallel

    destroy_model_parallel(keep=frozenset({torch.distributed.group.WORLD}))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small indexed dataset made from a few standard-library modules (the pretrain-script tests share it and its
    index cache)."""
    import json
    import shutil
    import subprocess

    root = tmp_path_factory.mktemp("data")
    json_modules = ("decoder.py", "encoder.py", "scanner.py")
    sources = [os.path.join(os.path.dirname(json.__file__), name) for name in json_modules]
    sources += [shutil.__file__, subprocess.__file__]
    for source in sources:
        shutil.copy(source, root / (os.path.basename(source) + ".txt"))
    prefix = str(root / "tiny")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "preprocess_data.py"), "--input", *map(str, root.glob("*.txt")),
         "--output-prefix", prefix],
        check=True, capture_output=True,
    )
    return dict(prefix=prefix, cache=str(root / "cache"))
