"""Tiny GPT+MTP models, batches, a Megatron training step, and full<->sharded weight/grad mapping.

The same code runs in the pytest process (the one-process reference) and in spawned ranks (TP/PP/EP),
so a parallel run can be compared with the reference tensor by tensor.
"""

import re
from typing import Dict, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_mtp_block_spec,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from megatron_mtp import cpu_bridge
from megatron_mtp.compat import batch_on_this_cp_rank
from megatron_mtp.config import MTPConfig
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.loss import MTPStats
from megatron_mtp.model import MTPGPTModel, MTPModelMixin

VOCAB = 96
SEQ = 16
BATCH = 2
HIDDEN = 32


def transformer_config(
    mtp: MTPConfig,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    sp: bool = False,
    num_layers: int = 4,
    num_experts: Optional[int] = None,
    moe_aux_loss_coeff: float = 0.0,
    bf16: bool = False,
    **overrides,
) -> TransformerConfig:
    """A small config; ``num_experts`` makes every decoder layer MoE (top-2, allgather dispatcher).

    MoE router settings beyond the aux-loss coefficient (``moe_z_loss_coeff``,
    ``moe_router_load_balancing_type``, ...) go in ``overrides``. ``bf16``: bf16 parameters and pipeline
    messages, as Megatron-LM's ``--bf16`` sets them; fp32 otherwise.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe = {}
    if num_experts:
        moe = dict(
            num_moe_experts=num_experts,
            moe_router_topk=2,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_ffn_hidden_size=48,
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            add_bias_linear=False,  # as MoE models are trained; expert biases hit an in-place-on-view path
            expert_model_parallel_size=ep,
        )
    settings = dict(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        ffn_hidden_size=64,
        num_attention_heads=4,
        normalization="RMSNorm",
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        mtp_num_layers=mtp.megatron_mtp_num_layers,
        **moe,
    )
    return TransformerConfig(**{**settings, **overrides})


def decoder_spec(config: TransformerConfig, vp_stage: Optional[int] = None):
    """This stage's decoder block spec (local modules), made to run on CPU by :func:`for_cpu`."""
    return for_cpu(get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage), config)


def for_cpu(spec, config: TransformerConfig):
    """``spec`` with the CPU bridge's stand-ins for what TE provides on GPU: norms that accept sequence
    parallelism, and under context parallelism the all-gather core attention."""
    spec = cpu_bridge.with_sequence_parallel_norms(spec)
    if config.context_parallel_size > 1:
        spec = cpu_bridge.with_context_parallel_attention(spec)
    return spec


def build_model(
    config: TransformerConfig, mtp: MTPConfig, tied: bool = False, position: str = "rope", vp_stage: Optional[int] = None
):
    """This rank's stage (virtual stage ``vp_stage`` under virtual pipeline parallelism)."""
    spec = decoder_spec(config, vp_stage)
    mtp_spec = None
    if mtp.enabled:  # from the model's last decoder layer: a pipeline layout may give the MTP stage none
        last_layer = get_gpt_decoder_layer_specs(config, use_transformer_engine=False)[-1]
        mtp_spec = for_cpu(get_mtp_block_spec(last_layer, mtp), config)
    return MTPGPTModel(
        config,
        spec,
        VOCAB,
        SEQ,
        mtp_config=mtp,
        mtp_block_spec=mtp_spec,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=tied,
        position_embedding_type=position,
        vp_stage=vp_stage,
    )


def build_chunks(config: TransformerConfig, mtp: MTPConfig, tied: bool = False) -> List[MTPGPTModel]:
    """This rank's model chunks: one per virtual pipeline stage of ``config`` (one without)."""
    if not config.virtual_pipeline_model_parallel_size:
        return [build_model(config, mtp, tied=tied)]
    stages = range(config.virtual_pipeline_model_parallel_size)
    return [build_model(config, mtp, tied=tied, vp_stage=stage) for stage in stages]


def build_model_with_weights(config: TransformerConfig, mtp: MTPConfig, tied: bool, weights: Optional[dict] = None):
    """``build_model``, loaded with ``weights`` (an earlier model's) when given; returns it and a copy of its
    initial weights, so that variants of one model can be compared from the same start."""
    model = build_model(config, mtp, tied=tied)
    if weights is not None:
        model.load_state_dict(weights)
    return model, {name: value.clone() for name, value in model.state_dict().items() if value is not None}


def build_megatron_core_model(config: TransformerConfig, tied: bool = False, position: str = "rope") -> GPTModel:
    """Megatron-Core's own GPTModel with its MTP block (``get_gpt_mtp_block_spec``, which is empty off the last
    stage), built as :func:`build_model` builds ours: the reference for sequential MTP."""
    spec = decoder_spec(config)
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    return GPTModel(
        config,
        spec,
        VOCAB,
        SEQ,
        mtp_block_spec=for_cpu(mtp_spec, config),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type=position,
    )


def wrap_ddp(model, config, use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False):
    """Megatron-Core DDP as Megatron-LM wraps a model; in bf16 around ``Float16Module``, with fp32 ``main_grad``
    (Megatron-LM's default for bf16: gradients accumulated and reduced in fp32)."""
    if config.bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=config.bf16,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def wrap_ddp_chunks(chunks: List, config) -> List[DistributedDataParallel]:
    """``wrap_ddp`` for each model chunk; the interleaved schedule takes one ``no_sync`` per chunk."""
    wrapped = [wrap_ddp(chunk, config) for chunk in chunks]
    if len(wrapped) > 1:
        config.no_sync_func = [chunk.no_sync for chunk in wrapped]
    return wrapped


def adam(model, config, lr: float, use_distributed_optimizer: bool = False):
    """Megatron-Core's Adam for a ``wrap_ddp`` model: fp32 main parameters in bf16 (sharded across data-parallel
    ranks with ``use_distributed_optimizer``, which needs the DDP wrapped with it too), gradients clipped at 1."""
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            clip_grad=1.0,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        [model],
    )


def make_batches(num_microbatches: int, seed: int = 0, fully_masked_microbatch: Optional[int] = None) -> List[dict]:
    """Random tokens; labels are tokens shifted by one; some tail positions masked out."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(num_microbatches):
        stream = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        loss_mask = torch.ones(BATCH, SEQ)
        loss_mask[0, SEQ - 3 :] = 0
        loss_mask[1, 5] = 0
        if index == fully_masked_microbatch:
            loss_mask.zero_()
        batches.append(
            dict(
                tokens=stream[:, :-1].contiguous(),
                labels=stream[:, 1:].contiguous(),
                loss_mask=loss_mask,
                position_ids=torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
                attention_mask=torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1),
            )
        )
    return batches


def train_step(
    model, config, batches: List[dict], stats: Optional[MTPStats] = None, mtp_step=None, sequence_mean: bool = False
):
    """One Megatron forward/backward over the micro-batches (1F1B under PP, interleaved with virtual stages).
    Returns per-micro-batch LM loss reports [loss sum, tokens] (this rank's share under context parallelism).

    ``model`` (DDP-wrapped, or a list of DDP-wrapped chunks) is ours (GPT or hybrid) or Megatron-Core's; ``stats``
    and ``mtp_step`` are for ours. Each context-parallel rank gets its chunks of every sequence (Megatron-Core's
    ``get_batch_on_this_cp_rank``). The loss is Megatron-LM's: each rank's masked mean (a sum with
    ``calculate_per_token_loss``); ``sequence_mean``: the mean over the whole sequence's tokens (counted over the CP
    group) in Megatron-LM's two-value form, which the schedule multiplies by the CP size and which equals one
    process's under CP."""
    chunks = model if isinstance(model, list) else [model]
    mtp_kwargs = dict(mtp_stats=stats, mtp_step=mtp_step) if isinstance(unwrap_model(chunks[0]), MTPModelMixin) else {}
    cp_group = parallel_state.get_context_parallel_group()

    def forward_step(data_iterator, model):
        batch = batch_on_this_cp_rank(dict(next(data_iterator)), cp_group)
        output = model(
            batch["tokens"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            **mtp_kwargs,
        )

        def loss_func(per_token_loss):
            mask = batch["loss_mask"].float()
            loss_sum = (per_token_loss.float() * mask).sum()
            report = {"lm loss": torch.stack((loss_sum.detach(), mask.sum()))}
            if not sequence_mean:
                return loss_sum, mask.sum().to(torch.int), report
            tokens = mask.sum()
            torch.distributed.all_reduce(tokens, group=cp_group)
            return loss_sum / tokens.clamp(min=1), report

        return output, loss_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        # One iterator per chunk: each chunk's forward draws every micro-batch.
        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    return [report["lm loss"] for report in reports]


_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def global_names(model) -> Dict[str, torch.nn.Parameter]:
    """Parameters by the name they have in a one-process model (decoder layers and experts made global), of a
    model or of a rank's list of model chunks."""
    if isinstance(model, list):
        names = {}
        for chunk in model:
            chunk_names = global_names(chunk)
            assert not names.keys() & chunk_names.keys(), sorted(names.keys() & chunk_names.keys())
            names.update(chunk_names)
        return names
    core = unwrap_model(model, (DistributedDataParallel, Float16Module))
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    names = {}
    for name, param in core.named_parameters():
        match = _DECODER_LAYER.match(name)
        if match:
            layer = core.decoder.layers[int(match.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end() :]
        match = _LOCAL_EXPERT.search(name)
        if match:
            expert = ep_rank * core.config.num_moe_experts // core.config.expert_model_parallel_size + int(match.group(1))
            name = f"{name[: match.start()]}.local_experts.{expert}.{name[match.end() :]}"
        names[name] = param
    return names


def local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full (TP=1) tensor, following Megatron's partition attributes."""
    if param.shape == full.shape:
        return full
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp_size, dim=param.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]


def load_full_state(model, full: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in global_names(model).items():
            param.copy_(local_shard(param, full[name]))


def grad_of(param) -> torch.Tensor:
    return param.main_grad if hasattr(param, "main_grad") else param.grad


def max_grad_diffs(model, full_grads: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """|local grad - matching slice of the reference grad|, max per parameter."""
    return {
        name: (grad_of(param) - local_shard(param, full_grads[name])).abs().max().item()
        for name, param in global_names(model).items()
    }
