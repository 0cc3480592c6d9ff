"""``--hf-config`` for the pretrain script: the DeepSeek-V3 architecture of a Hugging Face ``config.json``.

The architecture flags take the HF config's values; one given explicitly with another value is an error.
Parallelism, precision, the MoE dispatcher, the aux-loss coefficient and the MTP loss settings stay flags.
"""

import argparse
import copy
import dataclasses
from typing import List, Optional

from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_mtp.deepseek.hf_config import load_hf_config, megatron_configs
from megatron_mtp.deepseek.model import build_model as build_deepseek_model
from megatron_mtp.model import MTPGPTModel
from megatron_mtp.training.checkpointing import model_signature


def architecture_flags(hf: dict) -> dict:
    """Pretrain-flag values (by argparse dest) that the HF config decides."""
    configs = megatron_configs(hf)  # validates the config, naming any unsupported key
    t = configs.transformer
    return dict(
        num_layers=t.num_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.ffn_hidden_size,
        num_attention_heads=t.num_attention_heads,
        group_query_attention=False,
        num_query_groups=None,
        position_embedding_type="rope",
        rotary_base=int(t.rotary_base),
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not configs.share_embeddings_and_output_weights,
        hidden_dropout=t.hidden_dropout,
        attention_dropout=t.attention_dropout,
        init_method_std=t.init_method_std,
        num_experts=t.num_moe_experts,
        moe_router_topk=t.moe_router_topk,
        moe_ffn_hidden_size=t.moe_ffn_hidden_size,
        mtp_num_layers=configs.mtp.num_layers,
        mtp_mode="sequential",
    )


def checkpoint_signature(hf: dict) -> dict:
    """The model signature a pretrain run with ``--hf-config`` for ``hf`` checks a ``--load`` checkpoint against."""
    flags = architecture_flags(hf)
    return model_signature(
        argparse.Namespace(**flags, max_position_embeddings=None, hybrid_layer_pattern=None), hf["vocab_size"]
    )


def apply_hf_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Optional[List[str]]) -> None:
    """Set ``args``' architecture flags from ``args.hf_config`` (before the MTP config is built from them)."""
    try:
        hf = load_hf_config(args.hf_config)
        flags = architecture_flags(hf)
    except (OSError, ValueError, NotImplementedError) as error:
        parser.error(f"--hf-config {args.hf_config}: {error}")
    explicit = _explicit_flags(parser, argv)
    for dest, value in flags.items():
        if dest in explicit and explicit[dest] != value:
            parser.error(
                f"--{dest.replace('_', '-')} {explicit[dest]} contradicts --hf-config {args.hf_config} ({value}); "
                "drop the flag"
            )
        setattr(args, dest, value)
    args.hf_vocab_size = hf["vocab_size"]


def vocab_size(tokenizer_vocab_size: int, args: argparse.Namespace) -> int:
    """The HF config's vocabulary (checkpoints keep its shape); the tokenizer must fit in it."""
    if tokenizer_vocab_size > args.hf_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab_size} tokens, more than the HF config's vocab_size "
            f"{args.hf_vocab_size}"
        )
    if args.hf_vocab_size % args.tensor_model_parallel_size:
        raise ValueError(
            f"the HF config's vocab_size {args.hf_vocab_size} is not divisible by --tensor-model-parallel-size"
        )
    return args.hf_vocab_size


def transformer_config(args: argparse.Namespace, **overrides) -> MLATransformerConfig:
    """The run's MLATransformerConfig: the HF architecture plus the run's parallel/precision ``overrides``."""
    return megatron_configs(
        args.hf_config,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_grouped_gemm=False,
        expert_model_parallel_size=args.expert_model_parallel_size,
        mtp_loss_scaling_factor=args.mtp_config.loss_scaling_factor,
        **overrides,
    ).transformer


def build_model(
    args: argparse.Namespace, config: MLATransformerConfig, use_transformer_engine: bool, vp_stage: Optional[int] = None
) -> MTPGPTModel:
    """This stage's DeepSeek-V3 model (virtual stage ``vp_stage``), on ``config`` (the instance DDP will use) and
    the run's MTP settings."""
    configs = dataclasses.replace(megatron_configs(args.hf_config), transformer=config, mtp=args.mtp_config)
    return build_deepseek_model(configs, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage)


def _explicit_flags(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> dict:
    """The flags given on the command line, by dest, with their values."""
    probe = copy.deepcopy(parser)  # its defaults change; the run's parser keeps its own
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return vars(probe.parse_known_args(argv)[0])
