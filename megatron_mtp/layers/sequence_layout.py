"""How a micro-batch's sequence dimension is laid out, and MTP's roll by k within that layout.

Two things change where token t + k lies relative to token t: packed documents (Megatron-Core's THD layout, the
roll stays within each document) and context parallelism (the sequence is split over CP ranks in Megatron's
load-balanced order, the roll crosses chunks and ranks; packed documents are each split that way). Under both
the roll gathers the whole packed row over CP, rolls within documents and keeps this rank's chunks of each
document. ``SequenceLayout`` describes both, so every MTP call site (the block's embedding roll, the loss's
labels and mask, the metrics, the latent targets) takes one argument.
"""

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mtp.layers.context_parallel import cp_size, to_local_chunks, to_natural_order
from megatron_mtp.layers.roll import PackedSequences, roll_left


@dataclass(frozen=True)
class SequenceLayout:
    """This micro-batch's sequence dimension: optional packed documents, optional context-parallel group.

    Attributes:
        sequences: the documents of a packed (THD, b=1) micro-batch; None: the whole dimension is one sequence.
        cp_group: the context-parallel group; None or size 1: this rank holds the whole sequence.
        cu_seqlens_padded: [n + 1] the packed documents' (padded) boundaries, along which CP splits them.
    """

    sequences: Optional[PackedSequences] = None
    cp_group: Optional[dist.ProcessGroup] = None
    cu_seqlens_padded: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, packed_seq_params, cp_group: Optional[dist.ProcessGroup] = None) -> "SequenceLayout":
        """From Megatron-Core's ``PackedSeqParams`` (None: unpacked; global cu_seqlens under CP) and the CP group."""
        if packed_seq_params is None:
            return cls(None, cp_group)
        sequences = PackedSequences.from_packed_seq_params(packed_seq_params)
        padded = packed_seq_params.cu_seqlens_q_padded
        return cls(sequences, cp_group, packed_seq_params.cu_seqlens_q if padded is None else padded)

    @property
    def context_parallel(self) -> bool:
        return cp_size(self.cp_group) > 1

    def roll(
        self, tensor: torch.Tensor, depth: int, dim: int = -1, fill: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``tensor`` rolled left by ``depth`` within this layout (see ``rolls``)."""
        return next(self.rolls(tensor, [depth], dim, fill))

    def rolls(
        self, tensor: torch.Tensor, depths: Sequence[int], dim: int = -1, fill: Optional[torch.Tensor] = None
    ) -> Iterator[torch.Tensor]:
        """One roll per depth: position t reads token t + depth of its own sequence (document), else ``fill``'s
        value at t (zero when None). Lazily, one depth at a time; under CP the whole sequence is gathered once.

        Args:
            tensor: this rank's tokens along ``dim``: e.g. labels [b, s] or embeddings [s, b, h] (s: this CP rank's
                two chunks, s/cp of the sequence, under CP). Differentiable; under CP the gradient of the
                gathered sequence is reduce-scattered back to each rank's chunks.
            depths: shifts, each in [0, whole sequence length].
            fill: shaped like ``tensor`` (e.g. tail embeddings, without gradient).
        Yields:
            Per depth a tensor shaped like ``tensor``, in this rank's layout.
        """
        if not self.context_parallel:
            for depth in depths:
                yield roll_left(tensor, depth, dim, self.sequences, fill)
            return
        dim = dim % tensor.dim()
        natural = to_natural_order(tensor, self.cp_group, dim, self.cu_seqlens_padded)
        natural_fill = None if fill is None else to_natural_order(fill, self.cp_group, dim, self.cu_seqlens_padded)
        for depth in depths:
            rolled = roll_left(natural, depth, dim, self.sequences, natural_fill)
            yield to_local_chunks(rolled, self.cp_group, dim, self.cu_seqlens_padded)
