"""Build an ``MTPGPTModel`` with the DeepSeek-V3 architecture of a Hugging Face config.

Decoder: ``first_k_dense_replace`` dense layers, then MoE layers (``moe_layer_freq``), all with MLA and its
q/kv layernorms. MTP: sequential depths whose transformer layer is a full MoE layer, as in DeepSeek-V3.
Modules are TransformerEngine's when it is importable, else Megatron-Core's local ones with
:class:`SDPACoreAttention` (the local core attention cannot take MLA's different key and value head sizes). Either
way checkpoints carry TransformerEngine's tensor names (:mod:`megatron_mtp.checkpoint_names`), so a checkpoint
written on a host without TransformerEngine loads on one with it and the reverse.
"""

import dataclasses
import os
from typing import Mapping, Optional, Union

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import multi_latent_attention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_mtp import cpu_bridge
from megatron_mtp.checkpoint_names import with_te_checkpoint_names
from megatron_mtp.deepseek.cpu_attention import SDPACoreAttention
from megatron_mtp.deepseek.hf_config import DeepSeekV3Configs, megatron_configs
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.model import MTPGPTModel


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def decoder_block_spec(
    configs: DeepSeekV3Configs, use_transformer_engine: bool, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder layer specs (dense first, then MoE)."""
    spec = get_gpt_decoder_block_spec(
        configs.transformer, use_transformer_engine=use_transformer_engine, normalization="RMSNorm", vp_stage=vp_stage
    )
    if use_transformer_engine:
        return spec
    spec = dataclasses.replace(spec, layer_specs=[_local_layer(s) for s in spec.layer_specs])
    return _cpu_norms(spec, configs)


def mtp_block_spec(configs: DeepSeekV3Configs, use_transformer_engine: bool) -> Optional[ModuleSpec]:
    """The MTP block: each depth's transformer layer is a MoE layer (dense if the HF config says so)."""
    if not configs.mtp.enabled:
        return None
    config = configs.transformer
    layer_spec_fn = get_gpt_layer_with_transformer_engine_spec if use_transformer_engine else get_gpt_layer_local_spec
    kwargs = {} if use_transformer_engine else {"normalization": "RMSNorm"}
    layer = layer_spec_fn(
        num_experts=config.num_moe_experts if configs.mtp_layer_is_moe else None,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=True,
        multi_latent_attention=True,
        **kwargs,
    )
    if not use_transformer_engine:
        layer = _local_layer(layer)
    spec = get_mtp_block_spec(layer, configs.mtp, use_transformer_engine=use_transformer_engine)
    return spec if use_transformer_engine else _cpu_norms(spec, configs)


def build_model(
    hf_config: Union[str, os.PathLike, Mapping, DeepSeekV3Configs],
    use_transformer_engine: Optional[bool] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    **overrides,
) -> MTPGPTModel:
    """The DeepSeek-V3 ``MTPGPTModel`` for this rank's pipeline stage.

    Args:
        hf_config: an HF ``config.json`` (dict, path, directory) or configs from :func:`megatron_configs`.
        use_transformer_engine: default: whether TransformerEngine is importable.
        pre_process, post_process: default: whether this rank (virtual stage ``vp_stage``) is the first / last
            pipeline stage.
        overrides: extra ``MLATransformerConfig`` fields (parallel sizes, dtypes, dispatcher...), only
            when ``hf_config`` is not already translated.
    """
    if isinstance(hf_config, DeepSeekV3Configs):
        if overrides:
            raise ValueError("pass overrides to megatron_configs, not with already translated configs")
        configs = hf_config
    else:
        configs = megatron_configs(hf_config, **overrides)
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if not transformer_engine_available():
        _mla_without_transformer_engine()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return MTPGPTModel(
        configs.transformer,
        decoder_block_spec(configs, use_transformer_engine, vp_stage),
        configs.vocab_size,
        configs.max_sequence_length,
        mtp_config=configs.mtp,
        mtp_block_spec=mtp_block_spec(configs, use_transformer_engine),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=configs.share_embeddings_and_output_weights,
        # MLA computes its own (YaRN) rotary embedding; GPTModel builds none for MLA with "rope".
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def _local_layer(layer_spec: ModuleSpec) -> ModuleSpec:
    """A local-spec layer with MLA's core attention on SDPA, saving under TransformerEngine's names."""
    attention = layer_spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    layer_spec = dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention)
    )
    return with_te_checkpoint_names(layer_spec)


def _mla_without_transformer_engine() -> None:
    # Without TransformerEngine, Megatron's TE extension module still imports (its TE names are MagicMock
    # placeholders), so MLA believes HAVE_TE and fails on isinstance(linear_proj, TELinear).
    multi_latent_attention.HAVE_TE = False


def _cpu_norms(spec, configs: DeepSeekV3Configs):
    # Megatron's torch norm refuses sequence parallelism; the bridge's norm takes it (same parameter names).
    return cpu_bridge.with_sequence_parallel_norms(spec) if configs.transformer.sequence_parallel else spec
