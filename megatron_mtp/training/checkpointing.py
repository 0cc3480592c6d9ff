"""Save and resume training with Megatron-Core ``dist_checkpointing`` (torch_dist format).

Layout (Megatron-LM's): ``ROOT/iter_0000100/`` and ``ROOT/latest_checkpointed_iteration.txt``. A checkpoint is
written to ``iter_0000100.partial`` and renamed into place once every rank has finished, and the tracker file
is replaced atomically afterwards: a save killed midway leaves the previous checkpoint and the tracker intact.
Model and optimizer state are sharded tensors, so a checkpoint saved at one TP/PP loads at another.
"""

import os
import random
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def _metadata() -> Dict[str, Any]:
    """Sharded-state-dict metadata, as Megatron-LM passes it (GPTModel needs ``dp_cp_group`` on an MTP stage).

    ``fully_reshardable``: the distributed optimizer saves per-parameter state, so TP/PP/DP may change on load.
    """
    return ensure_metadata_has_dp_cp_group({"distrib_optim_sharding_type": "fully_reshardable"})


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int:
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"--load {root}: no checkpoint there ({TRACKER_FILE} is missing)")
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"--load {root}: {tracker} should hold an iteration number, got {text!r}")
    return int(text)


def save_checkpoint(root, iteration, model, optimizer, scheduler, train_state: Dict[str, Any], signature: Dict[str, Any]) -> str:
    """Collective: every rank calls it. Returns the committed checkpoint directory."""
    final = iteration_dir(root, iteration)
    staging = final + ".partial"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by an earlier killed save
        os.makedirs(staging)
    dist.barrier()
    metadata = _metadata()
    model_state = model.sharded_state_dict(metadata=metadata)
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False, metadata=metadata),
        "rng_state": _rng_sharded_object(_rng_state()),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "train_state": train_state,
        "signature": signature,
        "optimizer_kinds": _optimizer_kinds(optimizer),
        "topology": _topology(),
    }
    dist_checkpointing.save(state, staging)
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):
            previous = final + ".old"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous)
        else:
            os.replace(staging, final)
        _write_atomically(os.path.join(root, TRACKER_FILE), str(iteration))
    dist.barrier()
    return final


def load_checkpoint(root, model, optimizer, scheduler, signature: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
    """Restore model, optimizer, LR schedule and (same topology) RNG. Returns (iteration, train_state)."""
    iteration = latest_iteration(root)
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load {root}: {TRACKER_FILE} names iteration {iteration} but {directory} is missing")
    common = dist_checkpointing.load_common_state_dict(directory)
    _check_signature(root, directory, common.get("signature", {}), signature)
    _check_optimizer_can_resume(root, optimizer)
    _check_optimizer_kinds(root, directory, common.get("optimizer_kinds"), optimizer)
    metadata = _metadata()
    model_state = model.sharded_state_dict(metadata=metadata)
    request = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata),
    }
    same_topology = common.get("topology") == _topology()
    if same_topology:
        request["rng_state"] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(request, directory)
    with torch.no_grad():  # fp32 distributed-optimizer main params are views of the model's leaf parameters
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_topology:
        _set_rng_state(loaded["rng_state"])
    return common["iteration"], common["train_state"]


def load_model_weights(root: str, model) -> int:
    """Load the model's weights only, as Megatron-LM's ``--finetune`` (``--no-load-optim --no-load-rng``): for a
    checkpoint without optimizer, scheduler or RNG state, such as one converted from Hugging Face. Any TP/PP/EP.
    Returns the checkpoint's iteration; the caller starts training afresh."""
    iteration = latest_iteration(root)
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load {root}: {TRACKER_FILE} names iteration {iteration} but {directory} is missing")
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=_metadata())}, directory)
    with torch.no_grad():
        model.load_state_dict(loaded["model"])
    return iteration


def _optimizer_kinds(optimizer) -> List[str]:
    """Megatron-Core's optimizer classes in use (e.g. ``Float16OptimizerWithFloat16Params`` for bf16,
    ``DistributedOptimizer``): each lays out its state in the checkpoint differently."""
    return [type(part).__name__ for part in getattr(optimizer, "chained_optimizers", [optimizer])]


def _check_optimizer_can_resume(root: str, optimizer) -> None:
    """Megatron-Core 0.16's distributed optimizer restores PyTorch Adam's state (used when neither
    TransformerEngine nor apex is installed) inexactly or not at all; refuse rather than resume wrongly."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if not HAVE_APEX_OR_TE and "DistributedOptimizer" in _optimizer_kinds(optimizer):
        raise NotImplementedError(
            f"--load {root} with --use-distributed-optimizer needs TransformerEngine or apex: without them "
            "Megatron-Core's distributed optimizer cannot restore the PyTorch Adam state exactly. Install "
            "TransformerEngine or apex, or load the model weights only with --finetune (a checkpoint saved "
            "without --use-distributed-optimizer resumes exactly)."
        )


def _check_optimizer_kinds(root: str, directory: str, saved: Optional[List[str]], optimizer) -> None:
    """Optimizer state saved by another kind of optimizer (bf16 vs fp32, distributed or not) does not load."""
    current = _optimizer_kinds(optimizer)
    if saved is not None and saved != current:
        raise ValueError(
            f"--load {root}: {directory} holds the state of {saved} optimizer(s), this run uses {current}: resume "
            "with the precision (--bf16/--fp32) and --use-distributed-optimizer setting of the run that saved it, "
            "or load the model weights only with --finetune"
        )


def _check_signature(root: str, directory: str, saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {current[key]!r}"
        for key in current
        if saved.get(key) != current[key]
    ]
    if differences:
        raise ValueError(
            f"--load {root}: {directory} was saved for a different model; " + "; ".join(differences)
        )


def _topology() -> Dict[str, int]:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
    )


def _rng_state() -> Dict[str, Any]:
    state = dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(state: Optional[Dict[str, Any]]) -> ShardedObject:
    """One RNG record per (PP, TP, EP) coordinate; the ranks sharing one (the expert-data-parallel group)
    are seeded alike, so only its first rank's record is written."""
    return ShardedObject(
        "rng_state",
        state,
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_expert_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_expert_data_parallel_rank(),
    )


def _write_atomically(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
