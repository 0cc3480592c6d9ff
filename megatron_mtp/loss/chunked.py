"""Memory-efficient output layer + vocab-parallel cross-entropy: the logits never exist for all tokens at once.

An MTP depth's loss needs ``logits = h @ W^T`` ([tokens, V/tp]) only to reduce them to one number per token.
Here the tokens go through in chunks of ``chunk_size``: each chunk's logits are made, reduced across the
tensor-parallel vocabulary slices (max, sum of exponentials, target logit, and the greedy id for the metrics)
and freed. Gradients come chunk by chunk as well, ``dL/dlogits = mask * (softmax - onehot)``:

- ``grad_in_forward=True``: the forward pass also computes ``dL/dh`` ([tokens, h]) and ``dL/dW`` ([V/tp, h],
  fp32) and keeps them; backward only multiplies them by the incoming gradient, which is a scalar because the
  result is a scalar loss. Three matmuls per chunk, like an ordinary linear + cross-entropy.
- ``grad_in_forward=False``: backward recomputes each chunk's logits. Four matmuls, nothing kept.

Peak memory: one chunk's fp32 logits (plus the kept gradients in the first variant) instead of every token's
logits and softmax. The tensor-parallel gradient reduction of ``h`` is left to the same region functions a
``ColumnParallelLinear`` uses (all-reduce, or reduce-scatter under sequence parallelism).
"""

from functools import partial

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_mtp.loss.metrics import vocab_slice_start
from megatron_mtp.loss.mtp_loss import DepthLoss, OutputHead

def chunked_depth_loss(
    hidden_states: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    want_predictions: bool,
    chunk_size: int,
    grad_in_forward: bool = True,
) -> DepthLoss:
    """Drop-in for ``mtp_loss.plain_depth_loss``: same loss, gradients and metrics, chunked.

    Args:
        hidden_states: h_k, [s, b, h] ([s/tp, b, h] under sequence parallelism).
        labels, loss_mask: already rolled for this depth, [b, s].
        want_predictions: also return the greedy ids, for the acceptance metrics.
    """
    output_layer = head.output_layer
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError("the chunked MTP loss supports output layers without bias only")
    weight = head.weight if head.weight is not None else output_layer.weight
    tp_group = head.tp_group
    if getattr(output_layer, "sequence_parallel", False):
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
    elif tp_group is not None and dist.get_world_size(tp_group) > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    seq_len, batch, hidden = hidden_states.shape
    loss_sum, predictions = ChunkedVocabParallelCrossEntropy.apply(
        hidden_states.reshape(seq_len * batch, hidden),
        weight,
        labels.t().reshape(-1),
        loss_mask.t().reshape(-1).to(torch.float32),
        tp_group,
        chunk_size,
        grad_in_forward,
        want_predictions,
    )
    return DepthLoss(loss_sum, predictions.view(seq_len, batch).t() if want_predictions else None)


def chunked(chunk_size: int, grad_in_forward: bool):
    """``chunked_depth_loss`` with its settings bound, for ``mtp_loss(depth_loss=...)``."""
    return partial(chunked_depth_loss, chunk_size=chunk_size, grad_in_forward=grad_in_forward)


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """``sum_t mask[t] * CE(x[t] @ W^T, labels[t])`` over a vocabulary split across ``tp_group``.

    forward(x [n, h], weight [V/tp, h], labels [n] global ids, mask [n] fp32, ...) ->
        (loss_sum scalar fp32, predictions [n] global greedy ids, or an empty tensor when not requested)
    """

    @staticmethod
    def forward(ctx, x, weight, labels, mask, tp_group, chunk_size, grad_in_forward, want_predictions):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        vocab_start = vocab_slice_start(weight, tp_group)
        keep_grads = grad_in_forward and any(ctx.needs_input_grad[:2])
        grad_x = torch.empty_like(x) if keep_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if keep_grads else None
        predictions = torch.empty(x.size(0) if want_predictions else 0, dtype=torch.long, device=x.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = _ChunkLogits(x[rows], weight, labels[rows], vocab_start, tp_group, want_predictions)
            loss_sum += (chunk.token_loss * mask[rows]).sum()
            if want_predictions:
                predictions[rows] = chunk.predictions
            if keep_grads:
                _backpropagate_chunk(chunk.grad_logits(mask[rows]), x, weight, rows, grad_x, grad_weight)
        ctx.tp_group, ctx.chunk_size, ctx.vocab_start = tp_group, chunk_size, vocab_start
        ctx.kept_grads, ctx.consumed, ctx.weight_dtype = keep_grads, False, weight.dtype
        if keep_grads:
            ctx.save_for_backward(grad_x, grad_weight)
        else:
            ctx.save_for_backward(x, weight, labels, mask)
        ctx.mark_non_differentiable(predictions)
        return loss_sum, predictions

    @staticmethod
    def backward(ctx, grad_loss, _grad_predictions):
        if ctx.kept_grads:
            # Scaled in place to save a weight-sized buffer, so a second backward would be wrong: refuse it.
            if ctx.consumed:
                raise RuntimeError("the chunked MTP loss keeps its gradients for one backward pass (no retain_graph)")
            ctx.consumed = True
            grad_x, grad_weight = ctx.saved_tensors
            return grad_x.mul_(grad_loss.to(grad_x.dtype)), grad_weight.mul_(grad_loss).to(ctx.weight_dtype), *_NONES
        x, weight, labels, mask = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, x.size(0), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            chunk = _ChunkLogits(x[rows], weight, labels[rows], ctx.vocab_start, ctx.tp_group, False)
            _backpropagate_chunk(chunk.grad_logits(mask[rows] * grad_loss), x, weight, rows, grad_x, grad_weight)
        return grad_x, grad_weight.to(weight.dtype), *_NONES


_NONES = (None,) * 6  # no gradient for labels, mask, tp_group, chunk_size, grad_in_forward, want_predictions


class _ChunkLogits:
    """One chunk's logits reduced over the vocabulary slices: per-token CE, greedy ids, and dCE/dlogits.

    x: [c, h], weight: [V/tp, h], labels: [c] global ids. Holds one fp32 [c, V/tp] buffer, reused in place.
    """

    def __init__(self, x, weight, labels, vocab_start, tp_group, want_predictions):
        shifted = (x @ weight.t()).float()  # [c, V/tp]
        if want_predictions:
            local_max, local_ids = shifted.max(dim=-1)
        else:
            local_max = shifted.amax(dim=-1)
        global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, tp_group)
        if want_predictions:
            # Lowest global id among the slices that hold the maximum, as a full-vocabulary argmax would give.
            candidates = torch.where(
                local_max == global_max,
                local_ids + vocab_start,
                torch.full_like(local_ids, torch.iinfo(torch.long).max),
            )
            self.predictions = _all_reduce(candidates, dist.ReduceOp.MIN, tp_group)
        shifted -= global_max.unsqueeze(-1)
        local_labels = labels - vocab_start
        self.owns_label = (local_labels >= 0) & (local_labels < weight.size(0))
        self.local_labels = torch.where(self.owns_label, local_labels, torch.zeros_like(local_labels))
        target = shifted.gather(-1, self.local_labels.unsqueeze(-1)).squeeze(-1) * self.owns_label
        self.exp = shifted.exp_()
        sums = _all_reduce(torch.stack((self.exp.sum(dim=-1), target)), dist.ReduceOp.SUM, tp_group)
        self.sum_exp = sums[0]
        self.token_loss = torch.log(self.sum_exp) - sums[1]  # [c]

    def grad_logits(self, scale: torch.Tensor) -> torch.Tensor:
        """scale[t] * (softmax - onehot(label)) for this slice, [c, V/tp] fp32 (overwrites the logits buffer).

        scale: [c], the loss mask (times the incoming gradient when recomputing in backward).
        """
        grad = self.exp.mul_((scale / self.sum_exp).unsqueeze(-1))
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, self.local_labels] -= scale * self.owns_label
        return grad


def _backpropagate_chunk(grad_logits, x, weight, rows, grad_x, grad_weight) -> None:
    """From one chunk's dL/dlogits [c, V/tp] (fp32): grad_x[rows] = it @ W ([c, h]) and grad_weight [V/tp, h] fp32
    += its transpose @ x[rows]."""
    grad_logits = grad_logits.to(x.dtype)
    grad_x[rows] = grad_logits @ weight
    if x.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.t(), x[rows])
    else:
        grad_weight += grad_logits.t() @ x[rows]


def _all_reduce(tensor: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)
    return tensor
