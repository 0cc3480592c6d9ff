"""Causal core attention under context parallelism for CPU runs, where TransformerEngine is missing.

Megatron-Core's local ``DotProductAttention`` refuses context parallelism (only TE's attention implements it).
This stand-in does what TE's ``cp_comm_type="all_gather"`` does: every CP rank all-gathers the keys and values
of the whole sequence and attends from its own queries, whose natural positions come from Megatron's
load-balanced layout (``layers/context_parallel.py``). The gather's backward reduce-scatters the key and value
gradients, so each rank receives the sum over all ranks' queries for its own tokens. Every ``cp_comm_type``
(p2p, a2a, their hierarchy) computes the same attention; this one communicates as ``all_gather`` whatever it
is. Packed (THD) micro-batches attend causally within each document, whose tokens every rank holds two chunks
of (``layers.context_parallel.thd_local_positions``). ``cpu_bridge`` puts it into specs in place of ``DotProductAttention``
(:func:`megatron_mtp.cpu_bridge.with_context_parallel_attention`).
"""

from typing import Optional

import torch
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.deepseek.cpu_attention import attend
from megatron_mtp.layers.context_parallel import local_positions, to_natural_order


class ContextParallelCoreAttention(MegatronModule):
    """softmax(q k^T / sqrt(d) + causal mask) v over the whole sequence's keys; Megatron's core-attention API."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"ContextParallelCoreAttention supports causal masks only, not {attn_mask_type}")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise NotImplementedError("ContextParallelCoreAttention supports plain softmax without a sliding window")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        if config.apply_query_key_layer_scaling:
            raise NotImplementedError("ContextParallelCoreAttention does not apply query-key layer scaling")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """
        Args:
            query: [s/cp, b, np, d]; key, value: [s/cp, b, ng, d] (this CP rank's two chunks; np heads of this
                TP rank, ng key/value groups dividing np). Packed: [t/cp, np, d] and [t/cp, ng, d].
            attention_mask: not read; the mask is causal in natural positions, as TE's causal attention.
            packed_seq_params: qkv_format 'thd' with the global (padded) cu_seqlens; None: one sequence per row.
        Returns:
            context: [s/cp, b, np * d] ([t/cp, 1, np * d] packed).
        """
        boundaries = None
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed attention needs qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
            boundaries = packed_seq_params.cu_seqlens_q_padded
            if boundaries is None:
                boundaries = packed_seq_params.cu_seqlens_q
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attention_bias is not None:
            raise NotImplementedError("ContextParallelCoreAttention does not support an attention bias")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise NotImplementedError(f"ContextParallelCoreAttention supports causal masks only, not {attn_mask_type}")
        key = to_natural_order(key, self.cp_group, 0, boundaries)  # [s, b, ng, d]
        value = to_natural_order(value, self.cp_group, 0, boundaries)
        query_positions = local_positions(query.shape[0], self.cp_group, query.device, boundaries)
        key_positions = torch.arange(key.shape[0], device=query.device)
        allowed = key_positions[None, :] <= query_positions[:, None]  # [s/cp, s]
        if boundaries is not None:  # and within one document
            document = torch.bucketize(key_positions, boundaries[1:].long().to(query.device), right=True)  # [s]
            allowed = allowed & (document[None, :] == document[query_positions][:, None])
        dropout_p = self.dropout_p if self.training else 0.0
        return attend(query, key, value, allowed, False, dropout_p, self.softmax_scale, self.config)
