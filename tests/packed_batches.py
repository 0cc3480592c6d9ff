"""One set of documents as a packed (THD) micro-batch and as separate padded sequences, for equality tests.

Documents of uneven lengths: one shorter than D + 1 = 3 tokens (no depth-2 target), one followed by padding in
the packed layout (``cu_seqlens_q_padded``). Labels are each document's own next tokens; one label is masked.
"""

from typing import List, Optional

import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mtp.data.packing import document_boundaries

from tiny import VOCAB

LENGTHS = [7, 2, 5, 7]
PADDED_LENGTHS = [7, 2, 8, 7]  # 24 positions: divisible by TP=2 for sequence parallelism


def documents(seed: int = 0) -> List[dict]:
    """Per document: tokens, labels, loss_mask [length]."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for index, length in enumerate(LENGTHS):
        stream = torch.randint(1, VOCAB, (length + 1,), generator=generator)
        loss_mask = torch.ones(length)
        if index == 0:
            loss_mask[3] = 0
        docs.append(dict(tokens=stream[:-1], labels=stream[1:], loss_mask=loss_mask))
    return docs


def separate_batch(docs: List[dict]) -> dict:
    """The documents as rows [n, s] padded at the end to the longest; causal mask; positions from 0."""
    rows, seq = len(docs), max(LENGTHS)
    batch = dict(
        tokens=torch.zeros(rows, seq, dtype=torch.long),
        labels=torch.zeros(rows, seq, dtype=torch.long),
        loss_mask=torch.zeros(rows, seq),
        position_ids=torch.arange(seq).expand(rows, seq).contiguous(),
        attention_mask=torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1),
        packed_seq_params=None,
    )
    for row, doc in enumerate(docs):
        for key in ("tokens", "labels", "loss_mask"):
            batch[key][row, : len(doc[key])] = doc[key]
    return batch


def packed_batch(docs: List[dict], padded: bool = True) -> dict:
    """The documents back to back in one row [1, t]; each followed by its padding when ``padded``."""
    slots = PADDED_LENGTHS if padded else LENGTHS
    total = sum(slots)
    batch = dict(
        tokens=torch.zeros(1, total, dtype=torch.long),
        labels=torch.zeros(1, total, dtype=torch.long),
        loss_mask=torch.zeros(1, total),
        position_ids=torch.zeros(1, total, dtype=torch.long),
        attention_mask=None,
    )
    start = 0
    for doc, slot in zip(docs, slots):
        length = len(doc["tokens"])
        for key in ("tokens", "labels", "loss_mask"):
            batch[key][0, start : start + length] = doc[key]
        batch["position_ids"][0, start : start + length] = torch.arange(length)
        start += slot
    batch["packed_seq_params"] = packed_seq_params(LENGTHS, slots if padded else None)
    return batch


def packed_seq_params(lengths: List[int], padded_lengths: Optional[List[int]] = None) -> PackedSeqParams:
    def cumulative(values):
        return torch.tensor([0, *values], dtype=torch.int32).cumsum(0).to(torch.int32)

    cu_seqlens = cumulative(lengths)
    cu_seqlens_padded = None if padded_lengths is None else cumulative(padded_lengths)
    max_length = max(padded_lengths or lengths)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens_padded,
        cu_seqlens_kv_padded=cu_seqlens_padded,
        max_seqlen_q=max_length,
        max_seqlen_kv=max_length,
    )


def targets_per_depth(tokens: torch.Tensor, loss_mask: torch.Tensor, eod: int, depths: int) -> List[int]:
    """Per depth k: the positions t of samples [b, s] whose target token t + k + 1 lies in t's document (which ends
    after its eod) and is not masked (loss_mask[t + k] = 1): the targets MTP may take on packed documents."""
    documents = document_boundaries(tokens, eod).tolist()
    mask = loss_mask.flatten()
    return [
        sum(int(mask[t + depth]) for start, end in zip(documents, documents[1:]) for t in range(start, end - depth))
        for depth in range(1, depths + 1)
    ]


def forward(model, batch: dict, **mtp_kwargs) -> torch.Tensor:
    """The per-token LM loss [b, s] of ``model`` on ``batch`` (training mode: with the MTP term attached)."""
    return model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        packed_seq_params=batch["packed_seq_params"],
        **mtp_kwargs,
    )


def train_step(model, batch: dict, **mtp_kwargs) -> torch.Tensor:
    """One forward/backward of one packed micro-batch (this rank's share) through Megatron's schedule, per-token
    loss form; returns this rank's [LM loss sum, tokens]."""

    def forward_step(data_iterator, model):
        output = forward(model, next(data_iterator), **mtp_kwargs)

        def loss_func(per_token_loss):
            loss_sum = (per_token_loss * batch["loss_mask"]).sum()
            tokens = batch["loss_mask"].sum()
            return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack((loss_sum.detach(), tokens))}

        return output, loss_func

    model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=batch["tokens"].shape[1], micro_batch_size=1, forward_only=False,
    )
    return reports[0]["lm loss"]
