"""The MTP loss: per-depth vocab-parallel cross-entropy, its weighted combination, and how it joins the
main loss's backward pass.

Alignment (labels[t] is token t+1): depth k at position t predicts token t+k+1, so its labels and loss mask
are the main ones rolled left by k, with zero (masked) tails; no target is taken past the sequence end.

    L = L_main + lambda * sum_k w_k L_k / sum_k w_k,   L_k = sum_t mask_k[t] CE_k[t] / sum_t mask_k[t]

(plus, when enabled, the latent semantic enhancement terms of ``loss/latent.py``, averaged the same way).
A depth with no valid token contributes 0, not NaN. Under ``calculate_per_token_loss`` L_k is the sum
(as in Megatron-Core), normalised later with the main loss by the global token count; with Megatron-Core 0.17+
the sum is first scaled by ``main tokens / depth tokens`` of the micro-batch, as that release does (``compat``).

Under context parallelism (CP) each rank holds two chunks of every sequence (``layers/context_parallel.py``):
labels and masks are rolled across the whole sequence, token counts are those of the whole sequence (summed
over the CP group), and each rank's term holds its own tokens' share of the sums, so the terms of the CP ranks
add up to the one-process term. Its gradient is scaled from the main loss's gradient summed over the CP group
(``inject_mtp_loss``).
"""

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mtp.compat import PER_TOKEN_LOSS_RESCALES_DEPTHS
from megatron_mtp.layers.context_parallel import cp_size
from megatron_mtp.layers.sequence_layout import SequenceLayout
from megatron_mtp.loss.latent import LatentTargets, latent_sums
from megatron_mtp.loss.metrics import vocab_parallel_argmax


class OutputHead(NamedTuple):
    """What turns hidden states into vocab-parallel logits and a per-token loss (shared by all depths)."""

    output_layer: torch.nn.Module  # ColumnParallelLinear: [s, b, h] -> [s, b, V/tp]
    weight: Optional[torch.Tensor]  # the word-embedding weight when tied, else None
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (labels [b, s], logits) -> [b, s]
    tp_group: Optional[torch.distributed.ProcessGroup] = None  # the vocabulary is split over this group


class DepthLoss(NamedTuple):
    loss_sum: torch.Tensor  # scalar, masked CE sum, differentiable; its value may be NaN unless stats were wanted
    predictions: Optional[torch.Tensor]  # [b, s] greedy ids (global vocabulary), when requested


def plain_depth_loss(
    hidden_states: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    want_stats: bool,
) -> DepthLoss:
    """One depth's loss with its full logits materialised (the reference implementation).

    Args:
        hidden_states: h_k, [s, b, h] ([s/tp, b, h] under SP; the output layer gathers).
        labels, loss_mask: already rolled for this depth, [b, s].
        want_stats: also return the greedy ids, for the acceptance metrics.
    """
    logits, _ = head.output_layer(hidden_states, weight=head.weight)  # [s, b, V/tp]
    token_loss = head.cross_entropy(labels, logits)  # [b, s]
    loss_sum = (token_loss * loss_mask).sum()
    predictions = vocab_parallel_argmax(logits.detach(), head.tp_group).t() if want_stats else None
    return DepthLoss(loss_sum, predictions)


class MTPLossResult(NamedTuple):
    term: torch.Tensor  # scalar: lambda * weighted MTP loss, differentiable (its value: see want_stats)
    stats: Optional[torch.Tensor]  # [D, 6] detached, metrics.STAT_FIELDS order; agreement with main still 0
    predictions: Optional[List[torch.Tensor]]  # per depth [b, s] greedy ids, aligned with the depth's labels


def mtp_loss(
    depth_hidden_states: Sequence[torch.Tensor],
    head: OutputHead,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    depth_weights: Sequence[float],
    loss_scale: float,
    per_token_loss: bool,
    depth_loss: Callable[..., DepthLoss] = plain_depth_loss,
    latent_targets: Optional[LatentTargets] = None,
    want_stats: bool = False,
    layout: SequenceLayout = SequenceLayout(),
) -> MTPLossResult:
    """
    Args:
        depth_hidden_states: [h_1, ..., h_D], each [s, b, h].
        labels, loss_mask: the main (next-token) labels and mask, [b, s] (s: this CP rank's chunks).
        depth_weights: w_1..w_D (unnormalised); loss_scale: lambda.
        depth_loss: ``plain_depth_loss`` or ``chunked.chunked_depth_loss`` (same results, less memory).
        latent_targets: adds the latent semantic enhancement terms (see ``loss/latent.py``), weighted by
            their own factors: ``sum_k w_k (lambda L_k + alpha LC_k + beta SA_k) / sum_k w_k``.
        want_stats: return the per-depth counts (loss sums, tokens, top-1 hits against the labels) and each
            depth's greedy ids, so ``metrics.count_main_agreement`` can compare them with the main model's
            afterwards. Without it ``stats`` and ``predictions`` are None, and a depth loss may leave its value
            to backward (the chunked loss does when it recomputes the logits there anyway): ``term`` then reads
            NaN while its gradient is exact. Training only needs the gradient; metrics steps ask for stats.
        layout: packed documents (labels and mask roll within each one) and the context-parallel group (they roll
            across its ranks; the stats stay this rank's own counts: sum them over the group).
    """
    loss_mask = loss_mask.float()
    depths = range(1, len(depth_hidden_states) + 1)
    masks = list(layout.rolls(loss_mask, depths))
    all_labels = layout.rolls(labels, depths)
    counts = torch.stack([loss_mask.sum()] + [mask.sum() for mask in masks])  # [1 + D]: main, then each depth
    if layout.context_parallel:
        dist.all_reduce(counts, group=layout.cp_group)
    main_tokens, *depth_tokens = counts.clamp(min=1.0).unbind()
    term = torch.zeros((), device=labels.device)
    all_stats: List[torch.Tensor] = []
    all_predictions: List[torch.Tensor] = []
    for depth, (hidden_states, weight, mask_k, labels_k, tokens) in enumerate(
        zip(depth_hidden_states, depth_weights, masks, all_labels, depth_tokens, strict=True), start=1
    ):
        result = depth_loss(hidden_states, head, labels_k, mask_k, want_stats)
        if per_token_loss:
            tokens = tokens / main_tokens if PER_TOKEN_LOSS_RESCALES_DEPTHS else 1.0
        depth_term = loss_scale * result.loss_sum
        latent = torch.zeros(2, device=labels.device)
        if latent_targets is not None:
            sums = latent_sums(hidden_states, depth, labels_k, mask_k, latent_targets)
            depth_term = (
                depth_term
                + latent_targets.consistency_weight * sums.consistency
                + latent_targets.anchoring_weight * sums.anchoring
            )
            latent = torch.stack((sums.consistency.detach(), sums.anchoring.detach()))
        term = term + weight * depth_term / tokens
        if want_stats:
            all_stats.append(_depth_stats(result, labels_k, mask_k, latent))
            all_predictions.append(result.predictions)
    term = term / sum(depth_weights)
    if not want_stats:
        return MTPLossResult(term, None, None)
    return MTPLossResult(term, torch.stack(all_stats), all_predictions)


@torch.no_grad()
def _depth_stats(result: DepthLoss, labels, loss_mask, latent) -> torch.Tensor:
    """[6] in metrics.STAT_FIELDS order; main agreement filled in later."""
    valid = loss_mask > 0
    zero = torch.zeros((), device=labels.device)
    hits = ((result.predictions == labels) & valid).sum().float()
    return torch.stack((result.loss_sum.detach().float(), valid.sum().float(), hits, zero, latent[0], latent[1]))


class _InjectMTPLoss(torch.autograd.Function):
    """Identity on the per-token LM loss in forward; in backward it also starts the MTP term's backward.

    The MTP term's gradient scale is read off the LM loss's own incoming gradient, so whatever the user's
    loss function and the pipeline schedule do to the main loss (mean over tokens, 1/num_microbatches,
    grad scaler, CP factor) applies to the MTP term too, with no global state:
    mean-form term: d total / d term = sum_t g[t]; sum-form (per-token) term: sum_t g[t] / main tokens.
    Under context parallelism both sums run over the whole sequence (all CP ranks), as the term's token counts
    do: the gradients of the CP ranks are then reduced like any other, and the MTP term weighs what the main
    loss weighs in total, however the loss function splits that between the ranks.
    """

    @staticmethod
    def forward(ctx, lm_loss, term, main_tokens, cp_group):
        ctx.save_for_backward(main_tokens)
        ctx.per_token = main_tokens is not None
        ctx.cp_group = cp_group
        return lm_loss.clone()

    @staticmethod
    def backward(ctx, grad_lm_loss):
        scale = grad_lm_loss.sum()
        main_tokens = ctx.saved_tensors[0] if ctx.per_token else None
        if cp_size(ctx.cp_group) > 1:
            scale, main_tokens = _summed_over_cp(ctx.cp_group, scale, main_tokens)
        if ctx.per_token:
            scale = scale / main_tokens.clamp(min=1.0)
        return grad_lm_loss, scale, None, None


def _summed_over_cp(cp_group, scale: torch.Tensor, main_tokens: Optional[torch.Tensor]):
    """``scale`` and ``main_tokens`` (scalars; the latter may be None) summed over the CP group in one all-reduce."""
    sums = torch.stack([scale.float()] + ([] if main_tokens is None else [main_tokens.float()]))
    dist.all_reduce(sums, group=cp_group)
    return sums[0].to(scale.dtype), None if main_tokens is None else sums[1]


def inject_mtp_loss(
    lm_loss: torch.Tensor,
    term: torch.Tensor,
    loss_mask: torch.Tensor,
    per_token_loss: bool,
    cp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Return ``lm_loss`` ([b, s], values unchanged) carrying ``term`` into the backward pass."""
    main_tokens = loss_mask.float().sum() if per_token_loss else None
    return _InjectMTPLoss.apply(lm_loss, term, main_tokens, cp_group)
