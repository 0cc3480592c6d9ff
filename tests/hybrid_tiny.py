"""Tiny hybrid models (attention, MLP and MoE layers by pattern) with our MTP, or with Megatron-Core's own
``HybridModel`` MTP (the reference), built alike on each pipeline stage. Megatron-Core 0.19+ only."""

import re
from typing import Dict

import torch

from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.models.hybrid.hybrid_layer_allocation import get_hybrid_total_layer_count
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp import cpu_bridge
from megatron_mtp.config import MTPConfig
from megatron_mtp.hybrid import MTPHybridModel, get_hybrid_mtp_block_spec, get_hybrid_stack_spec
from tiny import SEQ, VOCAB, transformer_config

PATTERN = "*-E*-E/*E/*E"
"""Four decoder layers of each kind's mix and two MTP depths of attention + MoE (two '|'-free PP stages)."""


def hybrid_config(mtp: MTPConfig, pattern: str = PATTERN, **settings) -> TransformerConfig:
    """``tiny.transformer_config`` with as many layers as ``pattern``'s decoder part, marked hybrid as Megatron-LM
    marks it."""
    return transformer_config(mtp, num_layers=get_hybrid_total_layer_count(pattern), is_hybrid_model=True, **settings)


def _stack_spec(config: TransformerConfig, pattern: str) -> ModuleSpec:
    return cpu_bridge.with_sequence_parallel_norms(get_hybrid_stack_spec(config, pattern, use_transformer_engine=False))


def _stage_args(tied: bool) -> dict:
    return dict(
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
    )


def build_hybrid_model(config: TransformerConfig, mtp: MTPConfig, pattern: str = PATTERN, tied: bool = False):
    spec = _stack_spec(config, pattern)
    mtp_spec = get_hybrid_mtp_block_spec(spec, pattern, mtp)
    return MTPHybridModel(
        config,
        spec,
        VOCAB,
        SEQ,
        pattern,
        mtp,
        mtp_block_spec=cpu_bridge.with_sequence_parallel_norms(mtp_spec) if mtp_spec else None,
        **_stage_args(tied),
    )


def build_megatron_core_hybrid_model(config: TransformerConfig, pattern: str = PATTERN, tied: bool = False):
    """Megatron-Core's ``HybridModel`` running its own MTP from ``pattern``'s MTP parts (local modules)."""
    spec = _stack_spec(config, pattern)
    norm = cpu_bridge.SequenceParallelNorm
    depth = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=norm, hnorm=norm, eh_proj=ColumnParallelLinear, mtp_model_layer=None, layer_norm=norm
        ),
    )
    spec.submodules.mtp_block_spec = ModuleSpec(
        module=MultiTokenPredictionBlock, submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[depth])
    )
    return HybridModel(config, spec, VOCAB, SEQ, hybrid_layer_pattern=pattern, **_stage_args(tied))


_GPT_LAYER = re.compile(r"^(decoder|mtp\.layers\.\d+\.mtp_model_layer)\.(layers\.(\d+)\.)?(\w+)\.(.*)$")
_MLP_PARTS = ("pre_mlp_layernorm", "mlp")


def hybrid_state_from_gpt(gpt_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A GPT model's weights under the names of the hybrid model with the same layers: each GPT transformer
    layer ``i`` is hybrid attention layer ``2i`` followed by MLP layer ``2i + 1`` (``"*-"``), in the decoder and
    in each MTP depth (``GPTModel``'s single MTP layer is the hybrid depth's layer 0 and 1)."""
    hybrid = {}
    for name, value in gpt_state.items():
        if name == "decoder.final_layernorm.weight":
            name = "decoder.final_norm.weight"
        match = _GPT_LAYER.match(name)
        if match and not name.startswith("decoder.final"):
            block, _, index, part, rest = match.groups()
            index = 2 * int(index or 0) + (part in _MLP_PARTS)
            name = f"{block}.layers.{index}.{part}.{rest}"
        hybrid[name] = value
    return hybrid
