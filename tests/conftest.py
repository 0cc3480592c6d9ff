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

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    cpu_bridge.manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
