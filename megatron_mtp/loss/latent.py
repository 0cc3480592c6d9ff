"""Latent semantic enhancement (arXiv 2604.06155): regress each MTP depth's output state toward fixed targets.

For depth k at position t (which predicts token t+k+1):

- latent consistency: ``MSE(h_k[t], stopgrad(h_0[t+k]))``, the trunk's own state at the position that predicts
  the same token as its next token;
- semantic anchoring: ``MSE(h_k[t], stopgrad(E[token t+k+1]))``, the target token's input embedding.

MSE is the mean over the hidden dimension; tokens are masked and summed like the cross-entropy terms (the
rolled loss mask of depth k is zero wherever ``t+k`` falls off the sequence). Targets carry no gradient.
Under sequence parallelism the states are gathered to the full sequence first (the shift by k crosses shard
boundaries); every tensor-parallel rank then computes the same sums and keeps its own shard's gradient.
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_mtp.layers.sequence_layout import SequenceLayout
from megatron_mtp.loss.metrics import vocab_slice_start


class LatentTargets(NamedTuple):
    """What the latent losses compare against; built once per micro-batch, shared by all depths."""

    consistency_weight: float
    anchoring_weight: float
    trunk_hidden: torch.Tensor  # h_0 as the output layer reads it, [s, b, h] ([s/tp, b, h] under SP)
    embedding_weight: Optional[torch.Tensor]  # vocab-parallel word embedding [V/tp, h]; needed for anchoring
    tp_group: Optional[dist.ProcessGroup]
    sequence_parallel: bool
    layout: SequenceLayout = SequenceLayout()  # the trunk's shift by k: within documents, across CP chunks


class LatentSums(NamedTuple):
    consistency: torch.Tensor  # scalar, sum_t mask[t] * MSE_t, differentiable w.r.t. h_k only
    anchoring: torch.Tensor


def latent_sums(
    hidden_states: torch.Tensor, depth: int, labels: torch.Tensor, loss_mask: torch.Tensor, targets: LatentTargets
) -> LatentSums:
    """
    Args:
        hidden_states: h_k, [s, b, h] ([s/tp, b, h] under SP).
        labels, loss_mask: rolled for this depth, [b, s]: labels[b, t] is token t+k+1.
    """
    hidden = _full_sequence(hidden_states, targets).float()  # [s, b, h]
    mask = loss_mask.t().float()  # [s, b]
    zero = hidden.new_zeros(())
    consistency = anchoring = zero
    if targets.consistency_weight:
        with torch.no_grad():
            trunk = _full_sequence(targets.trunk_hidden, targets).float()
            shifted_trunk = targets.layout.roll(trunk, depth, dim=0)  # [s, b, h]: h_0[t+k]
        consistency = _masked_mse_sum(hidden, shifted_trunk, mask)
    if targets.anchoring_weight:
        if targets.embedding_weight is None:
            raise ValueError("semantic anchoring needs the word embedding on this pipeline stage")
        with torch.no_grad():
            embedded = vocab_parallel_lookup(targets.embedding_weight, labels, targets.tp_group)  # [b, s, h]
        anchoring = _masked_mse_sum(hidden, embedded.transpose(0, 1).float(), mask)
    return LatentSums(consistency, anchoring)


@torch.no_grad()
def vocab_parallel_lookup(weight: torch.Tensor, ids: torch.Tensor, tp_group) -> torch.Tensor:
    """E[ids] from this rank's vocabulary slice ``weight`` [V/tp, h]; ids [b, s] global -> [b, s, h] on every rank."""
    local = ids - vocab_slice_start(weight, tp_group)
    owned = (local >= 0) & (local < weight.size(0))
    rows = torch.nn.functional.embedding(torch.where(owned, local, torch.zeros_like(local)), weight)
    rows = rows * owned.unsqueeze(-1)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(rows, group=tp_group)
    return rows


def _masked_mse_sum(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over [s, b] of mask * mean_h (hidden - target)^2."""
    return ((hidden - target).pow(2).mean(dim=-1) * mask).sum()


def _full_sequence(states: torch.Tensor, targets: LatentTargets) -> torch.Tensor:
    if not targets.sequence_parallel:
        return states
    # The loss is computed identically on every rank, so backward only takes this rank's slice (no reduction).
    return gather_from_sequence_parallel_region(states, tensor_parallel_output_grad=False, group=targets.tp_group)
