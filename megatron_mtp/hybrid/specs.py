"""Hybrid stack specs: Megatron-Core's (TransformerEngine) or one of local modules for CPU runs, and the MTP block
spec whose depths (or heads) are small hybrid stacks of the pattern's MTP part.

A hybrid layer pattern (Megatron-Core's ``hybrid_layer_pattern``) names one layer per symbol: ``*`` attention,
``-`` MLP, ``E`` MoE, ``M`` Mamba (and ``G``, ``D``, ``+``); ``|`` separates pipeline stages and each ``/``-separated
part after the first is one MTP depth, e.g. ``"*-*E/*-/*-"``: four decoder layers, two depths of attention + MLP.
"""

import dataclasses
from typing import Optional

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols, parse_hybrid_pattern
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers.specs import get_mtp_block_spec

LOCAL_LAYER_SYMBOLS = (Symbols.ATTENTION, Symbols.MLP, Symbols.MOE)
"""The layer types of the local (non-TransformerEngine) hybrid spec: ordinary Megatron-Core modules."""


def check_pattern_runs_here(pattern: str) -> None:
    """Refuse, naming the pattern, layer types that cannot run on this machine: Mamba and gated delta-net layers
    need CUDA kernels (mamba_ssm, causal-conv1d, fla)."""
    kernel_layers = sorted({s for s in pattern if s in (Symbols.MAMBA, Symbols.GDN)})
    if kernel_layers and not torch.cuda.is_available():
        raise ValueError(
            f"hybrid layer pattern {pattern!r} has {' and '.join(repr(s) for s in kernel_layers)} (Mamba / gated "
            f"delta-net) layers, which need CUDA kernels; without CUDA use attention '*', MLP '-' and MoE 'E' layers"
        )


def get_hybrid_stack_spec(config: TransformerConfig, pattern: str, use_transformer_engine: bool) -> ModuleSpec:
    """The ``HybridStack`` spec for ``pattern``: Megatron-Core's own (TransformerEngine modules) or, without
    TransformerEngine, attention, MLP and MoE layers of local modules (the layers of a local GPT layer spec,
    split in two as the hybrid stack splits them)."""
    check_pattern_runs_here(pattern)
    if use_transformer_engine:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return hybrid_stack_spec
    unsupported = sorted({s for s in pattern if s in Symbols.VALID_LAYERS and s not in LOCAL_LAYER_SYMBOLS})
    if unsupported:
        raise ValueError(
            f"hybrid layer pattern {pattern!r}: the local (non-TransformerEngine) hybrid spec builds only "
            f"{', '.join(repr(s) for s in LOCAL_LAYER_SYMBOLS)} layers, not {', '.join(repr(s) for s in unsupported)}"
        )
    if Symbols.MOE in pattern and not config.num_moe_experts:
        raise ValueError(
            f"hybrid layer pattern {pattern!r} has MoE layers ('E'): set the number of experts (--num-experts)"
        )
    local = dict(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    dense = get_gpt_layer_local_submodules(**local)
    moe = get_gpt_layer_local_submodules(num_experts=config.num_moe_experts, moe_grouped_gemm=False, **local)
    no_attention = dict(input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    no_mlp = dict(pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    submodules = HybridStackSubmodules(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=dataclasses.replace(dense, **no_mlp)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=dataclasses.replace(dense, **no_attention)),
        moe_layer=(
            ModuleSpec(module=MoETransformerLayer, submodules=dataclasses.replace(moe, **no_attention))
            if config.num_moe_experts
            else IdentityOp
        ),
    )
    return ModuleSpec(module=HybridStack, submodules=submodules)


def check_mtp_parts(pattern: str, mtp_config: MTPConfig) -> Optional[str]:
    """The pattern's MTP part (``"*-"`` in ``"*-*E/*-/*-"``), None without one; it must have one MTP part per
    depth (or head) of ``mtp_config``."""
    parsed = parse_hybrid_pattern(pattern)
    if parsed.mtp_num_depths != mtp_config.num_layers:
        example = f"{parsed.main_pattern or '*-'}{('/' + (parsed.mtp_pattern or '*-')) * max(mtp_config.num_layers, 1)}"
        raise ValueError(
            f"hybrid layer pattern {pattern!r} has {parsed.mtp_num_depths} MTP part(s) after '/', but MTP "
            f"num_layers is {mtp_config.num_layers}: write one '/'-separated part per depth (or head), e.g. {example!r}"
        )
    return parsed.mtp_pattern


def get_hybrid_mtp_block_spec(
    hybrid_stack_spec: ModuleSpec, pattern: str, mtp_config: MTPConfig, use_transformer_engine: bool = False
) -> Optional[ModuleSpec]:
    """The MTP block spec (``megatron_mtp.layers``) whose every depth or head holds a :class:`HybridMTPStack` of
    the pattern's MTP part; None when MTP is off."""
    mtp_pattern = check_mtp_parts(pattern, mtp_config)
    if not mtp_config.enabled:
        return None
    inner = ModuleSpec(
        module=HybridMTPStack, submodules=hybrid_stack_spec.submodules, params={"layer_type_list": list(mtp_pattern)}
    )
    return get_mtp_block_spec(inner, mtp_config, use_transformer_engine=use_transformer_engine)


class HybridMTPStack(HybridStack):
    """The layers of one MTP depth (or head) as a hybrid stack, built as Megatron-Core's hybrid MTP builds them:
    numbered 1..n within the depth, marked as MTP layers, no final norm (the depth has its own). Called as the
    depth calls a ``TransformerLayer``.

    Checkpoints (torch_dist) name it ``mtp_model_layer``, as Megatron-Core's hybrid MTP does.

    Args:
        layer_type_list: the symbols of the pattern's MTP part.
        layer_number, is_mtp_layer: what an MTP depth passes to its inner layer; a hybrid MTP depth numbers its
            layers itself and marks them all as MTP layers.
    """

    mtp_checkpoint_name = "mtp_model_layer"

    def __init__(
        self,
        config: TransformerConfig,
        submodules: HybridStackSubmodules,
        layer_type_list: list,
        pg_collection,
        layer_number: int = 1,
        is_mtp_layer: bool = True,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(
            config,
            submodules,
            pre_process=True,
            layer_type_list=layer_type_list,
            pp_layer_offset=0,
            post_layer_norm=False,
            post_process=True,
            pg_collection=pg_collection,
            is_mtp_layer=True,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
    ):
        """hidden_states: [s, b, h] ([s/tp, b, h] under SP). Returns (the same shape, None), as a layer does."""
        if rotary_pos_cos is not None or rotary_pos_sin is not None or inference_context is not None:
            raise NotImplementedError("hybrid MTP depths take neither fused-RoPE cos/sin nor an inference context")
        output = super().forward(
            hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params
        )
        return output, None
