"""Core attention for packed (THD) micro-batches without TransformerEngine or flash-attention.

Megatron-Core's local ``DotProductAttention`` refuses ``packed_seq_params``; on GPU, TE's fused attention takes
``cu_seqlens`` instead of a mask. This stand-in does the same on CPU with an explicit mask: causal attention
within each packed document (block-diagonal), over ``scaled_dot_product_attention``. It is
:class:`~megatron_mtp.deepseek.cpu_attention.SDPACoreAttention` when nothing is packed.
"""

from typing import Optional

import torch
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType

from megatron_mtp.deepseek.cpu_attention import SDPACoreAttention


def packed_causal_mask(packed_seq_params, length: int) -> Tensor:
    """[length, length] bool, True where query i must not see key j: j > i, or j in another document.

    Documents are the segments of ``cu_seqlens_q_padded`` (else ``cu_seqlens_q``), so a document's padding
    follows it inside its segment and no real token sees it; positions after the last segment form one more.
    Example: cu_seqlens_q [0, 2, 3] -> query 1 sees keys {0, 1}, query 2 sees {2}.
    """
    boundaries = packed_seq_params.cu_seqlens_q_padded
    if boundaries is None:
        boundaries = packed_seq_params.cu_seqlens_q
    positions = torch.arange(length, device=boundaries.device)
    document = torch.bucketize(positions, boundaries[1:].long(), right=True)  # [length]
    other_document = document.unsqueeze(1) != document.unsqueeze(0)
    future = positions.unsqueeze(1) < positions.unsqueeze(0)
    return other_document | future


class PackedSDPACoreAttention(SDPACoreAttention):
    """``SDPACoreAttention`` that also takes Megatron-Core's ``PackedSeqParams`` (qkv_format 'thd', causal)."""

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
            query: [t, np, d] packed (Megatron's ``Attention`` drops the b=1 dimension for THD), else
                [sq, b, np, d]; key, value likewise with ng groups.
            attention_mask: ignored when packed (the documents define the mask).
        Returns:
            packed: [t, 1, np * d]; else [sq, b, np * d].
        """
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention needs qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"packed attention is causal; got attention mask type {mask_type}")
        if query.dim() != 3:
            raise ValueError(f"packed (THD) attention needs micro-batch size 1; got queries {tuple(query.shape)}")
        if query.shape[0] != key.shape[0]:
            raise ValueError("packed attention needs as many queries as keys (self-attention)")
        mask = packed_causal_mask(packed_seq_params, query.shape[0])
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, 1, n, d]
        return super().forward(query, key, value, mask.view(1, 1, *mask.shape), mask_type, attention_bias)
