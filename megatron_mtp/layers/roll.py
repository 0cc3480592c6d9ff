"""Shift token-aligned tensors left along the sequence, the way MTP aligns depth k with token t+k.

Packed micro-batches (Megatron-Core's THD layout: documents back to back in one row, described by a
``PackedSeqParams``) shift within each document: no depth reads or predicts a token of the next document.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class PackedSequences:
    """Where the documents of a packed micro-batch lie along its token dimension.

    Document i holds positions ``starts[i] .. starts[i] + lengths[i] - 1``; positions between documents (the
    padding of ``cu_seqlens_q_padded``) and after the last one hold no token.

    Attributes:
        starts, lengths: [n] int64.
    """

    starts: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_packed_seq_params(cls, packed_seq_params) -> "PackedSequences":
        """From Megatron-Core's ``PackedSeqParams``: lengths from ``cu_seqlens_q``, starts from
        ``cu_seqlens_q_padded`` when given (then each document is followed by its padding), else ``cu_seqlens_q``.

        Example: cu_seqlens_q [0, 3, 5], cu_seqlens_q_padded [0, 4, 8] -> starts [0, 4], lengths [3, 2].
        """
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences need qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
        cu_seqlens = packed_seq_params.cu_seqlens_q
        if cu_seqlens is None:
            raise ValueError("packed sequences need PackedSeqParams.cu_seqlens_q")
        cu_seqlens = cu_seqlens.long()
        padded = packed_seq_params.cu_seqlens_q_padded
        padded = cu_seqlens if padded is None else padded.long()
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if padded.shape != cu_seqlens.shape or bool((padded[1:] - padded[:-1] < lengths).any()):
            raise ValueError(
                f"cu_seqlens_q_padded {padded.tolist()} must give each sequence of cu_seqlens_q "
                f"{cu_seqlens.tolist()} at least its own length"
            )
        return cls(starts=padded[:-1], lengths=lengths)

    def same_sequence(self, shift: int, length: int) -> torch.Tensor:
        """[length] bool: True at t when tokens t and t + shift belong to one document.

        Example: starts [0, 4], lengths [3, 2], shift 1, length 8 -> [T, T, F, F, T, F, F, F].
        """
        positions = torch.arange(length, device=self.starts.device)
        starts = self.starts.unsqueeze(1)  # [n, 1]
        ends = starts + self.lengths.unsqueeze(1)
        return ((positions >= starts) & (positions + shift < ends)).any(dim=0)


def roll_left(
    tensor: torch.Tensor,
    shift: int,
    dim: int = -1,
    sequences: Optional[PackedSequences] = None,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[..., t] = tensor[..., t + shift]`` where token t + shift is in token t's own sequence, else
    ``fill[..., t]`` (zero when ``fill`` is None).

    Args:
        tensor: e.g. token ids, labels or a loss mask, shape [b, s] (any shape; ``dim`` is the sequence).
        shift: how many positions to move left, 0 <= shift <= length of ``dim``.
        sequences: the documents of a packed tensor along ``dim``; None: the whole dimension is one sequence.
        fill: what positions without a token t + shift read, shaped like ``tensor`` (e.g. tail embeddings).
    Returns:
        A new tensor of the same shape and dtype. Zero fills carry no target: a rolled loss mask is 0 there,
        and at every padding position of a packed tensor.
    Example:
        roll_left(torch.tensor([[5, 6, 7, 8]]), 2) -> [[7, 8, 0, 0]]
        packed documents [5, 6, 7] [8, 9] (starts [0, 3], lengths [3, 2]): roll_left([[5, 6, 7, 8, 9]], 1)
        -> [[6, 7, 0, 9, 0]]
    """
    length = tensor.size(dim)
    if not 0 <= shift <= length:
        raise ValueError(f"roll_left shift must be in [0, {length}], got {shift}")
    kept = tensor.narrow(dim, shift, length - shift)
    tail_shape = list(tensor.shape)
    tail_shape[dim] = shift
    tail = tensor.new_zeros(tail_shape) if fill is None else fill.narrow(dim, length - shift, shift)
    rolled = torch.cat([kept, tail], dim=dim)
    if sequences is None:
        return rolled
    keep = sequences.same_sequence(shift, length)
    keep_shape = [1] * tensor.dim()
    keep_shape[dim] = length
    keep = keep.view(keep_shape)
    return torch.where(keep, rolled, torch.zeros_like(rolled) if fill is None else fill)
