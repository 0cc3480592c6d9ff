"""Micro-batches whose documents attend only within themselves (``--reset-attention-mask``), as packed sequences.

Megatron-LM resets the attention mask after each end-of-document token with a dense [s, s] mask per sample;
here the documents become Megatron-Core's packed (THD) layout instead: the samples of a micro-batch back to back in
one row, and a ``PackedSeqParams`` whose sequences end after each eod and at each sample's end (the eod belongs to
the document it ends, as in Megatron-LM's mask). Attention kernels that take ``cu_seqlens`` then need no mask, and
MTP depths roll within each document (see ``layers/roll.py``).
"""

from typing import Dict

import torch

from megatron.core.packed_seq_params import PackedSeqParams


def document_boundaries(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """cu_seqlens (int32 [n + 1]) of the documents in ``tokens`` [b, s] laid out as one row of b * s tokens.

    Example: tokens [[5, E, 6, 7], [8, 9, E, 4]] -> [0, 2, 4, 7, 8] (documents [5, E] [6, 7] [8, 9, E] [4]).
    """
    batch, seq = tokens.shape
    after_eod = torch.zeros(batch, seq, dtype=torch.bool, device=tokens.device)
    after_eod[:, 1:] = tokens[:, :-1] == eod
    after_eod[:, 0] = True  # every sample starts a sequence
    starts = after_eod.flatten().nonzero().flatten()
    end = torch.tensor([batch * seq], device=tokens.device)
    return torch.cat((starts, end)).to(torch.int32)


def as_packed_documents(batch: Dict[str, torch.Tensor], eod: int) -> Dict[str, torch.Tensor]:
    """A micro-batch of ``MicroBatchIterator`` (tokens, labels, loss_mask, position_ids [b, s]) as one packed row
    [1, b * s] with ``packed_seq_params`` (qkv_format 'thd') and no ``attention_mask``."""
    cu_seqlens = document_boundaries(batch["tokens"], eod)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    packed = {key: batch[key].reshape(1, -1) for key in ("tokens", "labels", "loss_mask", "position_ids")}
    packed["attention_mask"] = None
    packed["packed_seq_params"] = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return packed
