"""Build :class:`MTPGPTModel` where Megatron-LM's ``gpt_builder`` builds ``GPTModel`` (``MTPHybridModel`` when
Megatron-LM's ``--hybrid-layer-pattern`` asks for a hybrid model, megatron-core 0.19+)."""

import argparse
import copy
from typing import Callable, Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_decoder_layer_specs
from megatron.core.transformer.spec_utils import import_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training import print_rank_0
from megatron.training.arguments import core_transformer_config_from_args

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.megatron_lm.arguments import mtp_config_from_megatron_args
from megatron_mtp.model import MTPGPTModel

GPTBuilder = Callable[..., object]

UNSUPPORTED_DECODER_FLAGS = {
    "use_legacy_models": "--use-legacy-models",
    "experimental_attention_variant": "--experimental-attention-variant",
    "heterogeneous_layers_config_path": "--heterogeneous-layers-config-path",
    "yaml_cfg": "--yaml-cfg",
}
"""Megatron-LM flags (by dest) choosing decoders whose MTP layer spec megatron_mtp does not derive yet."""


def with_mtp(gpt_builder: GPTBuilder) -> GPTBuilder:
    """Megatron-LM's ``gpt_builder`` (same signature), building :class:`MTPGPTModel` when ``--mtp-num-layers`` is set.

    Without MTP the call goes to ``gpt_builder`` unchanged.
    """

    def builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        mtp_config = mtp_config_from_megatron_args(args)
        if not mtp_config.enabled:
            return gpt_builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)
        if getattr(args, "hybrid_layer_pattern", None):
            return build_mtp_hybrid_model(args, mtp_config, pre_process, post_process, vp_stage, config, pg_collection)
        return build_mtp_gpt_model(args, mtp_config, pre_process, post_process, vp_stage, config, pg_collection)

    return builder


def mtp_model_config(args: argparse.Namespace, config: Optional[TransformerConfig] = None) -> TransformerConfig:
    """Megatron-LM's ``TransformerConfig`` for this run, with ``mtp_num_layers`` as :class:`MTPGPTModel` needs it.

    Megatron-LM sets it to ``--mtp-num-layers`` (so its layout check counts the MTP modules); parallel heads need
    it unset (``MTPConfig.megatron_mtp_num_layers``). A config given is copied, not changed.
    """
    config = copy.copy(config) if config is not None else core_transformer_config_from_args(args)
    # Assigned rather than dataclasses.replace: __post_init__ would check the layout's 'm' count against None.
    config.mtp_num_layers = mtp_config_from_megatron_args(args).megatron_mtp_num_layers
    return config


def build_mtp_gpt_model(
    args: argparse.Namespace,
    mtp_config: MTPConfig,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
    config: Optional[TransformerConfig] = None,
    pg_collection=None,
) -> MTPGPTModel:
    """This pipeline stage of the GPT ``args`` describe, with our MTP on the last stage.

    The decoder spec is Megatron-Core's per-layer block spec (dense or MoE, local or TransformerEngine, or
    ``--spec``); the MTP layers use the last decoder layer's spec, as Megatron-LM's builder does.
    """
    _refuse_unsupported_decoder_flags(args)
    print_rank_0(f"building GPT model with megatron_mtp MTP ({mtp_config.mode}, D={mtp_config.num_layers}) ...")
    config = mtp_model_config(args, config)
    use_te = args.transformer_impl == "transformer_engine"
    spec_args = dict(use_transformer_engine=use_te, normalization=args.normalization, qk_l2_norm=args.qk_l2_norm)
    if args.spec is not None:
        decoder_spec = import_module(args.spec)
    else:
        decoder_spec = get_gpt_decoder_block_spec(config, vp_stage=vp_stage, **spec_args)
    last_layer_spec = get_gpt_decoder_layer_specs(config, vp_stage=vp_stage, **spec_args)[-1]
    mtp_block_spec = get_mtp_block_spec(last_layer_spec, mtp_config, use_transformer_engine=use_te)
    return MTPGPTModel(
        config=config,
        transformer_layer_spec=decoder_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        mtp_config=mtp_config,
        mtp_block_spec=mtp_block_spec,
        rope_scaling=args.use_rope_scaling,
        **_language_model_args(args, pre_process, post_process, vp_stage, pg_collection),
    )


def build_mtp_hybrid_model(
    args: argparse.Namespace,
    mtp_config: MTPConfig,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
    config: Optional[TransformerConfig] = None,
    pg_collection=None,
):
    """This pipeline stage of the hybrid model ``args`` describe (``--hybrid-layer-pattern``), with our MTP on the
    last stage: the pattern's MTP parts give each depth's (or head's) layers. The stack spec is ``--spec``,
    Megatron-Core's (TransformerEngine), or the local one (``--transformer-impl local``: '*', '-', 'E' layers)."""
    from megatron_mtp.hybrid import MTPHybridModel, get_hybrid_mtp_block_spec, get_hybrid_stack_spec

    _refuse_unsupported_decoder_flags(args)
    pattern = args.hybrid_layer_pattern
    print_rank_0(
        f"building hybrid model {pattern!r} with megatron_mtp MTP ({mtp_config.mode}, D={mtp_config.num_layers}) ..."
    )
    config = mtp_model_config(args, config)
    use_te = args.transformer_impl == "transformer_engine"
    stack_spec = import_module(args.spec) if args.spec is not None else get_hybrid_stack_spec(config, pattern, use_te)
    return MTPHybridModel(
        config=config,
        hybrid_stack_spec=stack_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        hybrid_layer_pattern=pattern,
        mtp_config=mtp_config,
        mtp_block_spec=get_hybrid_mtp_block_spec(stack_spec, pattern, mtp_config, use_transformer_engine=use_te),
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        **_language_model_args(args, pre_process, post_process, vp_stage, pg_collection),
    )


def _language_model_args(args: argparse.Namespace, pre_process, post_process, vp_stage, pg_collection) -> dict:
    """The arguments ``GPTModel`` and ``HybridModel`` take alike, as Megatron-LM's builders set them."""
    return dict(
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def _refuse_unsupported_decoder_flags(args: argparse.Namespace) -> None:
    for dest, flag in UNSUPPORTED_DECODER_FLAGS.items():
        if getattr(args, dest, None):
            raise ValueError(f"{flag} is not supported with megatron_mtp's MTP (--mtp-num-layers) yet")
