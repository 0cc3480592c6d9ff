"""Load a full Hugging Face DeepSeek-V3 state dict into a Megatron model at any TP / EP / PP.

Each rank takes its own slice of every full tensor: column- or row-parallel linear layers by their
``partition_dim`` (SwiGLU ``linear_fc1`` split as [gate slice; up slice], the way Megatron shards it),
the vocab-parallel embedding and output layer by vocabulary rows (zero rows pad a vocabulary Megatron
padded), the experts of this EP rank (sliced by the expert-tensor-parallel group), the decoder layers of
this pipeline stage. For tests and small models; :mod:`megatron_mtp.deepseek.mapping` names the tensors (the
names of the model built with TransformerEngine's spec, whichever spec built ``model``).
"""

import re
from typing import Dict, Mapping

import torch

from megatron.core import parallel_state

from megatron_mtp.checkpoint_names import te_state_dict_names
from megatron_mtp.deepseek.mapping import hf_to_megatron

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], hf_config) -> None:
    """Copy ``hf_state`` (full, dequantized HF tensors) into this rank's part of ``model``."""
    load_full_state_dict(model, hf_to_megatron(hf_state, hf_config))


def load_full_state_dict(model: torch.nn.Module, full_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a full Megatron state dict (TE-spec names at TP=PP=EP=1) into this rank's part of ``model``.
    Every parameter and expert-bias buffer of the model must be in ``full_state``."""
    local = local_tensors(model)
    missing = sorted(set(local) - set(full_state))
    if missing:
        raise KeyError(f"{len(missing)} model tensors are not in the state dict, e.g. {missing[:5]}")
    gated = model.config.gated_linear_unit
    with torch.no_grad():
        for name, tensor in local.items():
            tensor.copy_(local_slice(name, tensor, full_state[name], gated))


def local_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's parameters and expert biases, by their full-model TE-spec names (global layer and expert
    indices)."""
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tensors = dict(model.named_parameters())
    tensors.update((name, buf) for name, buf in model.named_buffers() if name.endswith("router.expert_bias"))
    te_names = te_state_dict_names(model, tensors)
    named = {}
    for name, tensor in tensors.items():
        name = te_names[name]
        match = _DECODER_LAYER.match(name)
        if match:
            layer = model.decoder.layers[int(match.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end() :]
        match = _LOCAL_EXPERT.search(name)
        if match:
            local_experts = model.config.num_moe_experts // model.config.expert_model_parallel_size
            expert = ep_rank * local_experts + int(match.group(1))
            name = f"{name[: match.start()]}.local_experts.{expert}.{name[match.end() :]}"
        named[name] = tensor
    return named


def local_slice(name: str, local: torch.Tensor, full: torch.Tensor, gated_linear_unit: bool) -> torch.Tensor:
    """The part of ``full`` that ``local`` (named ``name``) holds on this rank."""
    if name in _VOCAB_PARALLEL and full.shape[0] < local.shape[0] * _tp_size(name):
        padding = full.new_zeros(local.shape[0] * _tp_size(name) - full.shape[0], *full.shape[1:])
        full = torch.cat([full, padding])
    if local.shape == full.shape:
        return full
    dim = getattr(local, "partition_dim", None)
    if dim is None:
        raise ValueError(f"{name}: local shape {tuple(local.shape)} differs from full {tuple(full.shape)}")
    size, rank = _tp_size(name), _tp_rank(name)
    if gated_linear_unit and name.endswith("linear_fc1.weight"):
        gate, up = torch.chunk(full, 2, dim=0)
        part = torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
    else:
        part = full.chunk(size, dim=dim)[rank]
    if part.shape != local.shape:
        raise ValueError(f"{name}: slice {tuple(part.shape)} of {tuple(full.shape)} does not fit {tuple(local.shape)}")
    return part


def _is_routed_expert(name: str) -> bool:
    return ".local_experts." in name


def _tp_size(name: str) -> int:
    if _is_routed_expert(name):
        return parallel_state.get_expert_tensor_parallel_world_size()
    return parallel_state.get_tensor_model_parallel_world_size()


def _tp_rank(name: str) -> int:
    if _is_routed_expert(name):
        return parallel_state.get_expert_tensor_parallel_rank()
    return parallel_state.get_tensor_model_parallel_rank()
