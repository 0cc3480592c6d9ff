"""Save and resume training with Megatron-Core ``dist_checkpointing`` (torch_dist format).

Layout (Megatron-LM's): ``ROOT/iter_0000100/`` and ``ROOT/latest_checkpointed_iteration.txt``. A checkpoint is
written to ``iter_0000100.partial`` and renamed into place once every rank has finished, and the tracker file
is replaced atomically afterwards: a save killed midway leaves the previous checkpoint and the tracker intact.
Model and optimizer state are sharded tensors, so a checkpoint saved at one TP/PP loads at another. Tensor names
are TransformerEngine's whichever spec built the model (:mod:`megatron_mtp.checkpoint_names`), so a checkpoint
saved with one spec loads with the other; TransformerEngine's ``_extra_state`` (FP8 metadata), which a model
without TE neither saves nor needs, may be absent.
"""

import os
import random
import shutil
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import unwrap_model

from megatron_mtp.checkpoint_names import absent_tensors_error
from megatron_mtp.compat import save_torch_dist

TRACKER_FILE = "latest_checkpointed_iteration.txt"
EXTRA_STATE = "_extra_state"


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
    """Collective: every rank calls it. ``model``: the module, or this rank's list of model chunks (virtual
    pipeline stages). Returns the committed checkpoint directory."""
    final = iteration_dir(root, iteration)
    staging = final + ".partial"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by an earlier killed save
        os.makedirs(staging)
    dist.barrier()
    metadata = _metadata()
    model_state = _model_state(model, metadata)
    state = {
        **model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False, metadata=metadata),
        "rng_state": _rng_sharded_object(_rng_state()),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "train_state": train_state,
        "signature": signature,
        "optimizer_kinds": _optimizer_kinds(optimizer),
        "topology": _topology(),
    }
    save_torch_dist(state, staging)
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


def model_signature(args, vocab_size: int) -> Dict[str, Any]:
    """What a checkpoint must match to be loaded into a run (shapes and MTP structure).

    ``args``: the pretrain script's flags by argparse dest (a namespace); ``vocab_size``: the padded vocabulary.
    """
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        padded_vocab_size=vocab_size,
        position_embedding_type=args.position_embedding_type,
        max_position_embeddings=args.max_position_embeddings if args.position_embedding_type == "learned_absolute" else None,
        normalization=args.normalization,
        swiglu=args.swiglu,
        bias_linear=args.add_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        num_experts=args.num_experts,
        mtp_num_layers=args.mtp_num_layers or 0,
        mtp_mode=args.mtp_mode,
        hybrid_layer_pattern=(args.hybrid_layer_pattern or "").replace("|", "") or None,  # stages may change
    )


def saved_signature(root: str) -> Dict[str, Any]:
    """The model signature recorded by the latest checkpoint under ``root`` ({} when it records none)."""
    _, directory = _latest_checkpoint(root)
    return dist_checkpointing.load_common_state_dict(directory).get("signature", {})


def check_saved_signature(root: str, signature: Dict[str, Any]) -> None:
    """Refuse, naming the differences, when the latest checkpoint under ``root`` records another signature."""
    saved = saved_signature(root)
    if saved:
        _check_signature(root, iteration_dir(root, latest_iteration(root)), saved, signature)


def load_checkpoint(root, model, optimizer, scheduler, signature: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
    """Restore model, optimizer, LR schedule and (same topology) RNG. Returns (iteration, train_state)."""
    _, directory = _latest_checkpoint(root)
    common = dist_checkpointing.load_common_state_dict(directory)
    _check_signature(root, directory, common.get("signature", {}), signature)
    _check_optimizer_can_resume(root, optimizer)
    _check_optimizer_kinds(root, directory, common.get("optimizer_kinds"), optimizer)
    metadata = _metadata()
    model_state = _model_state(model, metadata)
    request = {
        **model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata),
    }
    same_topology = common.get("topology") == _topology()
    if same_topology:
        request["rng_state"] = _rng_sharded_object(None)
    loaded = _load(request, directory, root)
    with torch.no_grad():  # fp32 distributed-optimizer main params are views of the model's leaf parameters
        _load_model_states(model, loaded, root)
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_topology:
        _set_rng_state(loaded["rng_state"])
    return common["iteration"], common["train_state"]


def load_model_weights(root: str, model, signature: Optional[Dict[str, Any]] = None) -> int:
    """Load the model's weights only, as Megatron-LM's ``--finetune`` (``--no-load-optim --no-load-rng``): for a
    checkpoint without optimizer, scheduler or RNG state, such as one converted from Hugging Face. Any TP/PP/EP.
    Returns the checkpoint's iteration; the caller starts training afresh.

    With ``signature``, a checkpoint recording another signature is refused, naming the differences. One that
    records none (written by another tool, e.g. Megatron-LM) loads with a warning: ``dist_checkpointing`` still
    refuses missing tensors and wrong global shapes, but not a same-shaped difference such as the MTP mode."""
    iteration, directory = _latest_checkpoint(root)
    if signature is not None:
        common = dist_checkpointing.load_common_state_dict(directory)
        if "signature" in common:
            _check_signature(root, directory, common["signature"], signature)
        else:
            warnings.warn(
                f"--load {root}: {directory} records no model signature (not written by this project's pretrain "
                "script or converter); only its tensor names and shapes are checked against this model"
            )
    loaded = _load(_model_state(model, _metadata()), directory, root)
    with torch.no_grad():
        _load_model_states(model, loaded, root)
    return iteration


def _chunks(model) -> List[torch.nn.Module]:
    return model if isinstance(model, (list, tuple)) else [model]


def _chunk_keys(model) -> List[str]:
    """Megatron-LM's keys for the model chunks: ``model``, or ``model0``, ``model1``, ... with virtual pipeline
    stages. Tensors are matched by their global names, not by these keys: a checkpoint loads at another number
    of virtual stages."""
    chunks = _chunks(model)
    return ["model"] if len(chunks) == 1 else [f"model{index}" for index in range(len(chunks))]


def _model_state(model, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The sharded state of every chunk of ``model`` (a module, or this rank's list of model chunks)."""
    return {
        key: chunk.sharded_state_dict(metadata=metadata) for key, chunk in zip(_chunk_keys(model), _chunks(model))
    }


def _load_model_states(model, loaded: Dict[str, Any], root: str) -> None:
    for key, chunk in zip(_chunk_keys(model), _chunks(model)):
        _load_model_state(chunk, loaded[key], root)


def _load(request: Dict[str, Any], directory: str, root: str) -> Dict[str, Any]:
    """``dist_checkpointing.load`` of ``request``, leaving out the ``_extra_state`` objects the checkpoint lacks
    (TE modules' FP8 metadata, absent when the checkpoint was written without TE); any other absent tensor or
    object is an error naming it."""
    loaded, _, absent = dist_checkpointing.load(request, directory, strict=StrictHandling.RETURN_UNEXPECTED)
    absent = [key for key in absent if not key.endswith(EXTRA_STATE)]
    if absent:
        checkpoint_keys = dist_checkpointing.load_tensors_metadata(directory)
        raise absent_tensors_error(f"--load {root}: {directory}", absent, checkpoint_keys)
    return loaded


def _load_model_state(model, state: Dict[str, Any], root: str) -> None:
    """``model.load_state_dict(state)``, where only ``_extra_state`` entries left out by :func:`_load` may miss.

    A bf16 model is loaded through the module ``Float16Module`` wraps (same keys): the wrapper's
    ``load_state_dict`` returns no report of missing and unexpected keys."""
    result = unwrap_model(model, Float16Module).load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"--load {root}: the loaded state does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _latest_checkpoint(root: str) -> Tuple[int, str]:
    """(iteration, directory) of the checkpoint the tracker file names."""
    iteration = latest_iteration(root)
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load {root}: {TRACKER_FILE} names iteration {iteration} but {directory} is missing")
    return iteration, directory


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
