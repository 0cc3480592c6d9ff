"""MTP metrics as additive counts: per-depth CE sums, token counts and top-1 agreement counts."""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_mtp.layers.sequence_layout import SequenceLayout

STAT_FIELDS = (
    "loss_sum",
    "tokens",
    "correct_label",
    "correct_main",
    "latent_consistency_sum",
    "semantic_anchoring_sum",
)


def vocab_slice_start(weight: torch.Tensor, tp_group) -> int:
    """The first global token id of this rank's contiguous vocabulary slice ``weight`` [V/tp, h]."""
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    return rank * weight.size(0)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Greedy token ids from vocab-parallel logits.

    Args:
        logits: [s, b, V/tp], this rank's contiguous slice of the vocabulary.
    Returns:
        [s, b] global token ids, equal to ``argmax`` over the full vocabulary (lowest id on ties).
    """
    local_max, local_ids = logits.max(dim=-1)
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    if tp_size == 1:
        return local_ids
    global_ids = local_ids + dist.get_rank(tp_group) * logits.size(-1)
    packed = torch.stack((local_max.float(), global_ids.float()))  # [2, s, b]; ids < 2^24 exact in fp32
    gathered = torch.empty((tp_size * 2, *packed.shape[1:]), dtype=packed.dtype, device=packed.device)
    dist.all_gather_into_tensor(gathered, packed, group=tp_group)
    gathered = gathered.view(tp_size, *packed.shape)  # [tp, 2, s, b]
    best_rank = gathered[:, 0].argmax(dim=0, keepdim=True)  # first maximum = lowest vocab slice
    return gathered[:, 1].gather(0, best_rank).squeeze(0).long()


@torch.no_grad()
def count_main_agreement(
    stats: torch.Tensor,
    depth_predictions: List[torch.Tensor],
    main_predictions: torch.Tensor,
    loss_mask: torch.Tensor,
    layout: SequenceLayout = SequenceLayout(),
) -> torch.Tensor:
    """``stats`` [D, 6] with ``correct_main`` filled in: valid targets where depth k's greedy id at position t
    equals the main model's at position t+k (the same target token).

    Args:
        depth_predictions: per depth [b, s]; main_predictions, loss_mask: [b, s] (main alignment; s: this
            context-parallel rank's chunks under CP).
        layout: packed documents and CP group of this micro-batch (``layers/sequence_layout.py``).
    """
    stats = stats.clone()
    depths = range(1, len(depth_predictions) + 1)
    masks = layout.rolls(loss_mask, depths)
    all_main = layout.rolls(main_predictions, depths)
    for depth, (predictions, mask, rolled_main) in enumerate(zip(depth_predictions, masks, all_main), start=1):
        stats[depth - 1, 3] = ((predictions == rolled_main) & (mask > 0)).sum()
    return stats


class MTPStats:
    """Accumulates per-depth counts over micro-batches; reduce across data-parallel ranks, then read.

    ``values[k-1]`` holds, for depth k: CE summed over valid tokens, valid tokens, tokens whose top-1
    prediction equals the label, and tokens whose top-1 equals the main model's greedy prediction for the
    same target position; then the latent consistency and semantic anchoring MSE sums, reported when
    ``latent_losses`` is set.
    """

    def __init__(self, num_depths: int, latent_losses: bool = False):
        self.num_depths = num_depths
        self.latent_losses = latent_losses
        self.values: Optional[torch.Tensor] = None

    def add(self, values: torch.Tensor) -> None:
        """values: [D, 6] in ``STAT_FIELDS`` order."""
        values = values.detach().to(torch.float64)
        self.values = values if self.values is None else self.values + values

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if self.values is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(self.values, group=group)

    def summary(self) -> Dict[str, float]:
        """``mtp_{k}_loss``, ``mtp_{k}_acc`` (vs labels), ``mtp_{k}_acc_main`` (vs main greedy), ``mtp_{k}_tokens``,
        and with latent losses ``mtp_{k}_latent_consistency``, ``mtp_{k}_semantic_anchoring`` (mean MSE per token)."""
        if self.values is None:
            return {}
        out = {}
        for depth, (loss_sum, tokens, correct_label, correct_main, consistency, anchoring) in enumerate(
            self.values.tolist(), start=1
        ):
            denominator = max(tokens, 1.0)
            out[f"mtp_{depth}_loss"] = loss_sum / denominator
            out[f"mtp_{depth}_acc"] = correct_label / denominator
            out[f"mtp_{depth}_acc_main"] = correct_main / denominator
            out[f"mtp_{depth}_tokens"] = tokens
            if self.latent_losses:
                out[f"mtp_{depth}_latent_consistency"] = consistency / denominator
                out[f"mtp_{depth}_semantic_anchoring"] = anchoring / denominator
        return out
