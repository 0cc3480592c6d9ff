"""One checkpoint naming whichever spec built the model: TransformerEngine's.

TransformerEngine fuses some norms into the linear layer after them, so a TE-built layer holds
``mlp.linear_fc1.layer_norm_weight`` where a local-spec layer holds ``pre_mlp_layernorm.weight``. Megatron-Core's
local GPT spec saves its norms under the fused names through TransformerLayer's ``sharded_state_dict_keys_map``
(a prefix map applied to the layer's torch_dist keys); its local MLA spec has no map, and its local MoE spec maps
``pre_mlp_layernorm`` although TE keeps that norm separate in MoE layers. :func:`with_te_checkpoint_names` gives a
local layer spec the map that makes its keys TE's, following what TE's spec fuses:

- ``input_layernorm``: its own module with MLA; else fused into ``self_attention.linear_qkv``.
- MLA's ``q_layernorm`` / ``kv_layernorm``: fused into ``linear_q_up_proj`` / ``linear_kv_up_proj``.
- ``pre_mlp_layernorm``: fused into ``mlp.linear_fc1`` in dense layers; its own module in MoE layers.

Every other tensor has one name in both specs. :func:`te_state_dict_names` gives the TE-spec model's state-dict
names for a model's own names; :mod:`megatron_mtp.deepseek.mapping` maps those to Hugging Face names. A checkpoint
that an earlier version wrote with local MLA names is recognised and refused, saying what to do
(:func:`absent_tensors_error`).
"""

import dataclasses
import functools
import inspect
from typing import Dict, Iterable

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

_MLA_NORMS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
_FUSED_INPUT_NORM = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
_FUSED_PRE_MLP_NORM = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _te_keys_map(layer_spec: ModuleSpec) -> Dict[str, str]:
    """The ``sharded_state_dict_keys_map`` giving a local-spec TransformerLayer TE's checkpoint names."""
    submodules = layer_spec.submodules
    keys = {}
    if issubclass(_module_class(submodules.self_attention), MLASelfAttention):
        keys.update(_MLA_NORMS)
    else:
        keys.update(_FUSED_INPUT_NORM)
    if not issubclass(_module_class(submodules.mlp), MoELayer):
        keys.update(_FUSED_PRE_MLP_NORM)
    return keys


def with_te_checkpoint_names(layer_spec: ModuleSpec) -> ModuleSpec:
    """``layer_spec`` (a local-spec TransformerLayer) whose checkpoint keys are those of TE's spec."""
    if not issubclass(_module_class(layer_spec), TransformerLayer):
        raise TypeError(f"expected a TransformerLayer spec, got one building {_module_class(layer_spec)}")
    submodules = dataclasses.replace(layer_spec.submodules, sharded_state_dict_keys_map=_te_keys_map(layer_spec))
    return dataclasses.replace(layer_spec, submodules=submodules)


def te_state_dict_names(model: torch.nn.Module, names: Iterable[str]) -> Dict[str, str]:
    """State-dict name in ``model`` -> the name of the same tensor in the model built with TE's spec, which is
    what each TransformerLayer's ``sharded_state_dict_keys_map`` makes of it (the first matching prefix, as
    Megatron-Core applies the map to checkpoint keys). Names outside such maps are unchanged."""
    keys_maps = {
        f"{module_name}.": module.submodules_config.sharded_state_dict_keys_map
        for module_name, module in model.named_modules()
        if isinstance(module, TransformerLayer)
    }

    def rename(name: str) -> str:
        for end in (i + 1 for i, char in enumerate(name) if char == "."):
            layer, rest = name[:end], name[end:]
            for old, new in keys_maps.get(layer, {}).items():
                if rest.startswith(old):
                    return layer + new + rest[len(old) :]
        return name

    return {name: rename(name) for name in names}


def absent_tensors_error(where: str, absent: Iterable[str], checkpoint_keys: Iterable[str]) -> Exception:
    """The error for model tensors ``absent`` from a checkpoint (``where`` names it) that holds
    ``checkpoint_keys``; it says so when the checkpoint has them under the local-spec MLA names megatron_mtp wrote
    before every checkpoint took TransformerEngine's names."""
    absent = sorted(absent)
    legacy = _legacy_names(absent, set(checkpoint_keys))
    if legacy:
        examples = ", ".join(f"{new} (saved as {old})" for new, old in list(legacy.items())[:3])
        return ValueError(
            f"{where} names {len(legacy)} tensors as megatron_mtp did before its checkpoints took "
            f"TransformerEngine's names, e.g. {examples}. Import the Hugging Face checkpoint again with this "
            "version (tools/convert_deepseek_v3.py import); export a checkpoint the pretrain script saved with the "
            "version that saved it (tools/convert_deepseek_v3.py export), then import it again (optimizer state "
            "is lost)."
        )
    return KeyError(f"{where} lacks {len(absent)} tensors of the model, e.g. {absent[:5]}")


def _legacy_names(absent: Iterable[str], checkpoint_keys: set) -> Dict[str, str]:
    """TE name -> the local name it had before, for the absent names the checkpoint holds that way."""
    fused = {new: old for old, new in {**_MLA_NORMS, **_FUSED_PRE_MLP_NORM}.items()}
    legacy = {}
    for name in absent:
        for new, old in fused.items():
            if f".{new}" in name and name.replace(f".{new}", f".{old}", 1) in checkpoint_keys:
                legacy[name] = name.replace(f".{new}", f".{old}", 1)
    return legacy


def _module_class(spec) -> type:
    """The class a spec builds: a ModuleSpec's module, or (Megatron-Core 0.19) the class behind a
    ``functools.partial`` of it or of a classmethod such as ``MLP.as_mlp_submodule``."""
    if isinstance(spec, ModuleSpec):
        spec = spec.module
    if isinstance(spec, functools.partial):
        spec = spec.func
    if inspect.ismethod(spec) and isinstance(spec.__self__, type):
        spec = spec.__self__
    if not isinstance(spec, type):
        raise TypeError(f"cannot tell which module the spec {spec!r} builds")
    return spec
