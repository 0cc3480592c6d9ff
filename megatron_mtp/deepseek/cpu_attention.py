"""Core attention for MLA without TransformerEngine, on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` assumes one head size for keys and values, so it cannot run
MLA (keys ``qk_nope + qk_rope`` wide, values ``v_head_dim`` wide). This module takes the same constructor and
forward arguments as Megatron's core attention and accepts ``k_channels`` / ``v_channels``.
"""

from contextlib import nullcontext
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * softmax_scale + mask) v with separate key and value head sizes.

    ``softmax_scale`` is the caller's (MLA passes ``mscale^2 / sqrt(q_head_dim)`` with YaRN's mscale);
    without one it is ``1 / sqrt(k_channels)``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPACoreAttention does not support context parallelism")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"SDPACoreAttention supports softmax_type 'vanilla', not {config.softmax_type!r}")
        if config.window_size is not None:
            raise NotImplementedError("SDPACoreAttention does not support sliding-window attention")
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels if k_channels is not None else config.kv_channels
        self.v_channels = v_channels if v_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.k_channels**-0.5
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
            query: [sq, b, np, k_channels]; key: [sk, b, ng, k_channels]; value: [sk, b, ng, v_channels]
                (np heads of this TP rank, ng key/value groups dividing np).
            attention_mask: bool, True where attention is masked out, broadcastable to [b, np, sq, sk];
                None with a causal mask type means causal.
        Returns:
            context: [sq, b, np * v_channels].
        """
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention does not support packed sequences")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not support an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        allowed, is_causal = None, False
        if attention_mask is not None:
            allowed = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal:
            if query.shape[0] != key.shape[0]:
                raise ValueError("a causal mask without an attention_mask needs as many queries as keys")
            is_causal = True
        elif mask_type != AttnMaskType.no_mask:
            raise ValueError(f"attention mask type {mask_type} needs an attention_mask")
        dropout_p = self.dropout_p if self.training else 0.0
        return attend(query, key, value, allowed, is_causal, dropout_p, self.softmax_scale, self.config)


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Optional[Tensor],
    is_causal: bool,
    dropout_p: float,
    scale: float,
    config: TransformerConfig,
) -> Tensor:
    """``scaled_dot_product_attention`` on Megatron's layouts.

    Args:
        query: [sq, b, np, dk]; key: [sk, b, ng, dk]; value: [sk, b, ng, dv] (ng key/value groups dividing np).
        allowed: bool, True where a query may attend a key, broadcastable to [b, np, sq, sk]; or None.
    Returns:
        context: [sq, b, np * dv].
    """
    heads, groups = query.shape[2], key.shape[2]
    if heads != groups:
        key = key.repeat_interleave(heads // groups, dim=2)
        value = value.repeat_interleave(heads // groups, dim=2)
    # [s, b, n, d] -> [b, n, s, d]
    query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    # Megatron draws attention dropout from the model-parallel RNG state (different per TP rank).
    forks_rng = dropout_p and not config.sequence_parallel
    with tensor_parallel.get_cuda_rng_tracker().fork() if forks_rng else nullcontext():
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    # [b, n, sq, dv] -> [sq, b, n * dv]
    return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)
