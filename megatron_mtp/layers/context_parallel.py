"""Megatron's load-balanced context-parallel (CP) sequence layout, and moving tensors in and out of it.

With CP size ``cp`` the sequence of length S is cut into ``2 cp`` chunks of ``S / (2 cp)`` tokens; CP rank r
holds chunks r and ``2 cp - 1 - r``, in that order (``megatron.core.utils.get_batch_on_this_cp_rank``), so that
causal attention costs the same on every rank. Shifting a sequence (MTP's roll by k) crosses chunk and rank
boundaries, so the shift is done in natural order: gather the whole sequence, shift, keep this rank's chunks
(``layers/sequence_layout.py``).

Packed (THD) micro-batches split each document instead (``thd_local_positions``): the functions below take its
boundaries ``cu_seqlens_padded`` ([n + 1], global positions) for that layout, None for one whole sequence.

Every function takes the CP process group; with ``cp_group`` None or of size 1 the layout is the identity.
"""

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def cp_size(cp_group: Optional[dist.ProcessGroup]) -> int:
    return 1 if cp_group is None else dist.get_world_size(cp_group)


def thd_local_positions(cu_seqlens_padded: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Natural positions [t / size] of CP rank ``rank``'s tokens of a packed micro-batch: every document (with its
    padding, a length divisible by 2 size) is cut into 2 size chunks, and the rank holds chunks ``rank`` and
    ``2 size - 1 - rank`` of each document, document after document (the split of TransformerEngine's
    ``thd_get_partitioned_indices``, which Megatron-LM's THD batches use).

    Example: cu_seqlens_padded [0, 4, 12], size 2, rank 0 -> [0, 3, 4, 5, 10, 11].
    """
    boundaries = cu_seqlens_padded.long().tolist()
    positions = []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        if (end - start) % (2 * size):
            raise ValueError(
                f"packed document [{start}, {end}) under context parallelism {size}: its padded length must be "
                f"divisible by {2 * size} (cu_seqlens_q_padded {boundaries})"
            )
        chunk = (end - start) // (2 * size)
        for index in (rank, 2 * size - 1 - rank):
            positions.extend(range(start + index * chunk, start + (index + 1) * chunk))
    return torch.tensor(positions, dtype=torch.long, device=cu_seqlens_padded.device)


def local_positions(
    local_length: int, cp_group: Optional[dist.ProcessGroup], device=None, cu_seqlens_padded=None
) -> torch.Tensor:
    """Natural-order positions [local_length] of this rank's tokens: chunk r, then chunk 2 cp - 1 - r (of each
    packed document when ``cu_seqlens_padded`` is given)."""
    size = cp_size(cp_group)
    if size == 1:
        return torch.arange(local_length, device=device)
    if cu_seqlens_padded is not None:
        return thd_local_positions(cu_seqlens_padded, size, dist.get_rank(cp_group)).to(device)
    rank = dist.get_rank(cp_group)
    chunk = _chunk_length(local_length)
    first = torch.arange(chunk, device=device) + rank * chunk
    return torch.cat((first, first + (2 * size - 1 - 2 * rank) * chunk))


def to_natural_order(
    local: torch.Tensor, cp_group: Optional[dist.ProcessGroup], dim: int = 0, cu_seqlens_padded=None
) -> torch.Tensor:
    """All CP ranks' tokens in sequence order.

    Args:
        local: this rank's two chunks along ``dim``, e.g. [s/cp, b, h] or [b, s/cp] (of each packed document
            with ``cu_seqlens_padded``).
    Returns:
        The whole sequence along ``dim`` (e.g. [s, b, h]), the same on every CP rank. Differentiable: the
        gradient that flows back is summed over the CP ranks (a reduce-scatter), each rank keeping its chunks'.
    """
    size = cp_size(cp_group)
    if size == 1:
        return local
    moved = local.movedim(dim, 0)
    # [cp * s/cp, ...], rank-major: chunks (0, 2cp-1), (1, 2cp-2), ...; backward reduce-scatters.
    gathered = gather_from_sequence_parallel_region(moved, tensor_parallel_output_grad=True, group=cp_group)
    if cu_seqlens_padded is not None:
        rank_positions = [thd_local_positions(cu_seqlens_padded, size, rank) for rank in range(size)]
        order = torch.cat(rank_positions).argsort().to(local.device)
        if order.numel() != gathered.size(0):
            raise ValueError(f"cu_seqlens_padded {cu_seqlens_padded.tolist()} must end at the {gathered.size(0)} tokens")
        return gathered.index_select(0, order).movedim(0, dim)
    chunk = _chunk_length(local.size(dim))
    chunks = gathered.view(2 * size, chunk, *moved.shape[1:])
    natural = chunks[_natural_chunk_index(size, local.device)]
    return natural.reshape(2 * size * chunk, *moved.shape[1:]).movedim(0, dim)


def to_local_chunks(
    full: torch.Tensor, cp_group: Optional[dist.ProcessGroup], dim: int = 0, cu_seqlens_padded=None
) -> torch.Tensor:
    """This rank's two chunks of a whole sequence ([s, ...] along ``dim`` -> [s/cp, ...]), of each packed
    document with ``cu_seqlens_padded``; a plain slice."""
    size = cp_size(cp_group)
    if size == 1:
        return full
    if cu_seqlens_padded is not None:
        positions = thd_local_positions(cu_seqlens_padded, size, dist.get_rank(cp_group))
        return full.index_select(dim, positions.to(full.device))
    if full.size(dim) % (2 * size):
        raise ValueError(f"sequence length {full.size(dim)} is not divisible by 2 x context-parallel size {size}")
    rank = dist.get_rank(cp_group)
    chunks = full.chunk(2 * size, dim=dim)
    return torch.cat((chunks[rank], chunks[2 * size - 1 - rank]), dim=dim)


def _chunk_length(local_length: int) -> int:
    if local_length % 2:
        raise ValueError(f"a context-parallel rank holds two equal chunks; got an odd local length {local_length}")
    return local_length // 2


def _natural_chunk_index(size: int, device) -> torch.Tensor:
    """Index into the rank-major chunk list that puts chunks in sequence order: chunk c sits at 2c for c < cp
    (rank c's first), and at 2 (2 cp - 1 - c) + 1 for c >= cp (rank 2 cp - 1 - c's second)."""
    return torch.tensor([2 * c if c < size else 2 * (2 * size - 1 - c) + 1 for c in range(2 * size)], device=device)
