"""Tearing down Megatron's parallel state in a process that goes on: its process groups destroyed, not only forgotten."""

import torch.distributed as dist
from megatron.core import parallel_state
from torch.distributed import distributed_c10d


def process_groups() -> frozenset:
    """Every ``torch.distributed`` process group this process holds, the default one included."""
    return frozenset(distributed_c10d._world.pg_map)


def destroy_model_parallel(keep: frozenset) -> None:
    """``parallel_state.destroy_model_parallel``, then destroy every process group not in ``keep``: Megatron's call
    only forgets its groups, and each gloo group keeps its threads until destroyed, so a process that outlives
    its parallel state (a test process, a conversion inside a running job) would pile them up."""
    parallel_state.destroy_model_parallel()
    for group in process_groups() - keep:
        dist.destroy_process_group(group)
