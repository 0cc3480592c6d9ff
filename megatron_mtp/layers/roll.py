"""Shift token-aligned tensors left along the sequence, the way MTP aligns depth k with token t+k."""

import torch


def roll_left(tensor: torch.Tensor, shift: int, dim: int = -1) -> torch.Tensor:
    """``out[..., t] = tensor[..., t + shift]``, with the last ``shift`` positions zero.

    Args:
        tensor: e.g. token ids, labels or a loss mask, shape [b, s] (any shape; ``dim`` is the sequence).
        shift: how many positions to move left, 0 <= shift <= length of ``dim``.
    Returns:
        A new tensor of the same shape and dtype. Zero tails carry no target: a rolled loss mask is 0 there.
    Example:
        roll_left(torch.tensor([[5, 6, 7, 8]]), 2) -> [[7, 8, 0, 0]]
    """
    length = tensor.size(dim)
    if not 0 <= shift <= length:
        raise ValueError(f"roll_left shift must be in [0, {length}], got {shift}")
    kept = tensor.narrow(dim, shift, length - shift)
    tail_shape = list(tensor.shape)
    tail_shape[dim] = shift
    return torch.cat([kept, tensor.new_zeros(tail_shape)], dim=dim)
