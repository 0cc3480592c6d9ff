"""Build what a training run needs from its flags: process groups, the model, DDP, optimizer, LR schedule."""

import argparse
import os
import socket
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_decoder_layer_specs
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp import cpu_bridge
from megatron_mtp.deepseek import training as deepseek_training
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.model import MTPGPTModel


@dataclass
class Runtime:
    device: str  # "cpu" or "cuda"
    bf16: bool  # bf16 parameters, fp32 main parameters in the optimizer
    grad_reduce_in_fp32: bool  # main_grad accumulated and reduced in fp32 (always in fp32 runs)
    data_parallel_size: int
    num_microbatches: int
    global_batch_size: int


def init_distributed(args: argparse.Namespace) -> Runtime:
    """Join the torchrun world (or a one-process world), set Megatron's parallel state, seed."""
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        cpu_bridge.enable()
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    world = dist.get_world_size()
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size x --pipeline-model-parallel-size "
            f"x --context-parallel-size = {model_parallel}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    if device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        torch.manual_seed(args.seed)
    else:
        cpu_bridge.manual_seed(args.seed)
    data_parallel = parallel_state.get_data_parallel_world_size()
    global_batch = args.global_batch_size or args.micro_batch_size * data_parallel
    if global_batch % (args.micro_batch_size * data_parallel):
        raise ValueError(
            f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size x data-parallel size "
            f"({args.micro_batch_size} x {data_parallel})"
        )
    num_microbatches = global_batch // (args.micro_batch_size * data_parallel)
    if args.virtual_pipeline_model_parallel_size and num_microbatches % args.pipeline_model_parallel_size:
        raise ValueError(
            f"virtual pipeline stages (interleaved 1F1B) need the micro-batches per step ({num_microbatches} = "
            f"--global-batch-size / (--micro-batch-size x data-parallel size {data_parallel})) to be a multiple of "
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}"
        )
    return Runtime(device, *precision(args), data_parallel, num_microbatches, global_batch)


def precision(args: argparse.Namespace) -> Tuple[bool, bool]:
    """(bf16, grad_reduce_in_fp32) as Megatron-LM sets them: bf16 with --bf16 only; gradients accumulated and
    reduced in fp32 unless --grad-reduce-in-bf16."""
    return args.bf16, not args.grad_reduce_in_bf16


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Pad to a multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size, as Megatron-LM does.

    The embedding's shape thus depends on TP where the vocabulary is not already a multiple of the larger
    multiple; a checkpoint loads at another TP size only where both give the same padded size (checked on load).
    The DeepSeek-V3 path keeps the HF config's vocabulary instead.
    """
    if getattr(args, "hf_config", None):
        return deepseek_training.vocab_size(vocab_size, args)
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config(args: argparse.Namespace, runtime: Runtime) -> TransformerConfig:
    dtype = torch.bfloat16 if runtime.bf16 else torch.float32
    run_settings = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        # Megatron-LM's defaults with virtual stages. Batched p2p would also be wrong over gloo at PP=2: the
        # activation and the gradient sent to the one neighbour are matched in posting order, and swap.
        overlap_p2p_comm=bool(args.virtual_pipeline_model_parallel_size),
        batch_p2p_comm=not args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        bf16=runtime.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=runtime.device == "cpu",
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
    )
    if getattr(args, "hf_config", None):
        return deepseek_training.transformer_config(args, **run_settings)
    moe = {}
    if args.num_experts:
        moe = dict(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            expert_model_parallel_size=args.expert_model_parallel_size,
            moe_grouped_gemm=False,
        )
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=args.add_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        # As Megatron-LM sets it, so a --pipeline-model-parallel-layout holds one 'm' per MTP depth or head ...
        mtp_num_layers=args.mtp_config.num_layers or None,
        mtp_loss_scaling_factor=args.mtp_config.loss_scaling_factor,
        # Megatron-LM's flag for --hybrid-layer-pattern: output-layer init scaled by 1/sqrt(layers), not 2 x layers.
        is_hybrid_model=bool(args.hybrid_layer_pattern),
        **moe,
        **run_settings,
    )
    # ... then what MTPGPTModel needs (parallel heads: unset), assigned past __post_init__'s layout check.
    config.mtp_num_layers = args.mtp_config.megatron_mtp_num_layers
    return config


def build_model(args: argparse.Namespace, runtime: Runtime, config: TransformerConfig, vocab_size: int):
    """This rank's MTPGPTModel chunks, one per virtual pipeline stage (one without), each wrapped in Megatron-Core
    DDP (around ``Float16Module`` in bf16, as Megatron-LM wraps it: bf16 parameters, fp32 outputs from the last
    stage). Returns the list Megatron-Core's schedules and optimizer take."""
    virtual = config.virtual_pipeline_model_parallel_size
    stages = range(virtual) if virtual else [None]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=runtime.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    mtp_config = replace(args.mtp_config, ddp_overlaps_grad_reduce=ddp_config.overlap_grad_reduce)
    args = argparse.Namespace(**{**vars(args), "mtp_config": mtp_config})
    chunks = []
    for vp_stage in stages:
        model = build_core_model(args, runtime, config, vocab_size, vp_stage)
        if runtime.bf16:
            model = Float16Module(config, model)
        chunks.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=model,
                disable_bucketing=len(chunks) > 0,  # as Megatron-LM: one bucket for every chunk after the first
            )
        )
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in chunks]
    config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    return chunks


def build_core_model(
    args: argparse.Namespace,
    runtime: Runtime,
    config: TransformerConfig,
    vocab_size: int,
    vp_stage: Optional[int] = None,
):
    """This rank's bare model stage (``MTPGPTModel``; ``MTPHybridModel`` with --hybrid-layer-pattern; virtual
    stage ``vp_stage`` with virtual pipeline stages; TransformerEngine modules on GPU when installed), on its device:
    what training wraps, and what generation runs."""
    use_te = runtime.device == "cuda" and _have_transformer_engine()
    if config.num_moe_experts and config.add_bias_linear and not use_te:
        raise ValueError(
            "--num-experts with bias linears (the default; --disable-bias-linear removes them) needs "
            "TransformerEngine: Megatron-Core's local expert MLP adds its bias in place into the output of a "
            "tensor-parallel reduction, which autograd refuses (megatron/core/transformer/mlp.py); give "
            "--disable-bias-linear"
        )
    if getattr(args, "hf_config", None):
        model = deepseek_training.build_model(args, config, use_te, vp_stage)
    elif getattr(args, "hybrid_layer_pattern", None):
        model = _build_hybrid_model(args, config, vocab_size, use_te)
    else:
        model = _build_gpt_model(args, config, vocab_size, use_te, vp_stage)
    if runtime.device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model


def _build_gpt_model(
    args: argparse.Namespace, config: TransformerConfig, vocab_size: int, use_te: bool, vp_stage: Optional[int]
) -> MTPGPTModel:
    block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    mtp_spec = None
    if args.mtp_config.enabled:
        # The model's last decoder layer, as Megatron-LM's builder takes it: the MTP stage may build no decoder layer.
        last_layer_spec = get_gpt_decoder_layer_specs(config, use_transformer_engine=use_te)[-1]
        mtp_spec = get_mtp_block_spec(last_layer_spec, args.mtp_config, use_transformer_engine=use_te)
    if not use_te:
        block_spec = cpu_bridge.with_sequence_parallel_norms(block_spec)
        mtp_spec = cpu_bridge.with_sequence_parallel_norms(mtp_spec)
        if args.reset_attention_mask:  # packed documents
            block_spec = cpu_bridge.with_packed_attention(block_spec)
            mtp_spec = cpu_bridge.with_packed_attention(mtp_spec)
        elif config.context_parallel_size > 1:
            block_spec = cpu_bridge.with_context_parallel_attention(block_spec)
            mtp_spec = cpu_bridge.with_context_parallel_attention(mtp_spec)
    return MTPGPTModel(
        config,
        block_spec,
        vocab_size,
        args.max_position_embeddings,
        mtp_config=args.mtp_config,
        mtp_block_spec=mtp_spec,
        **_stage_and_embedding_args(args, vp_stage),
    )


def _build_hybrid_model(args: argparse.Namespace, config: TransformerConfig, vocab_size: int, use_te: bool):
    """``MTPHybridModel`` from --hybrid-layer-pattern (megatron-core 0.19+; the flag is refused before, and
    with virtual pipeline stages)."""
    from megatron_mtp.hybrid import MTPHybridModel, get_hybrid_mtp_block_spec, get_hybrid_stack_spec

    pattern = args.hybrid_layer_pattern
    stack_spec = get_hybrid_stack_spec(config, pattern, use_transformer_engine=use_te)
    mtp_spec = get_hybrid_mtp_block_spec(stack_spec, pattern, args.mtp_config, use_transformer_engine=use_te)
    if not use_te:
        stack_spec = cpu_bridge.with_sequence_parallel_norms(stack_spec)
        mtp_spec = cpu_bridge.with_sequence_parallel_norms(mtp_spec)
    return MTPHybridModel(
        config,
        stack_spec,
        vocab_size,
        args.max_position_embeddings,
        pattern,
        args.mtp_config,
        mtp_block_spec=mtp_spec,
        **_stage_and_embedding_args(args, vp_stage=None),
    )


def _stage_and_embedding_args(args: argparse.Namespace, vp_stage: Optional[int]) -> dict:
    """The model arguments every model class takes alike from the flags: this rank's (virtual) stage, tied
    weights, positions."""
    return dict(
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
    )


def build_optimizer(args: argparse.Namespace, runtime: Runtime, model):
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            clip_grad=args.clip_grad,
            bf16=runtime.bf16,
            params_dtype=torch.bfloat16 if runtime.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    samples = runtime.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * samples,
        lr_decay_steps=args.lr_decay_iters * samples,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * samples,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
