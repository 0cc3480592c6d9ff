"""Memory-efficient output layer + vocab-parallel cross-entropy: fp32 logits never exist for all tokens at once.

A loss needs ``logits = h @ W^T`` ([tokens, V/tp]) only to reduce them to one number per token. One function
serves the main next-token loss (:func:`chunked_token_loss`: the per-token loss [b, s] Megatron's loss functions
take, whose incoming gradient is per token) and each MTP depth (:func:`chunked_depth_loss`: the masked sum).
Here the tokens go through in chunks of ``chunk_size``: each chunk's logits are made, reduced across the
tensor-parallel vocabulary slices (max, sum of exponentials, target logit, and the greedy id for the metrics)
and freed. Gradients come chunk by chunk as well, ``dL/dlogits = mask * (softmax - onehot)``:

- gradients in forward (a depth's masked sum only): the forward pass also computes ``dL/dh`` ([n, h]) and
  ``dL/dW`` ([V/tp, h], fp32) and keeps them; backward only multiplies them by the incoming gradient, which is a
  scalar because the result is a scalar loss. Three matmuls per chunk, like an ordinary linear + cross-entropy.
- recompute: backward recomputes each chunk's logits. Only the input ``[n, h]`` is kept. When the caller wants
  no metrics (``want_stats=False``: every training step but the logging ones) forward computes nothing and
  backward makes the loss's gradients in one pass: three matmuls per chunk, as Megatron-Core's linear +
  cross-entropy, and the forward loss value reads NaN (nothing needs it: the MTP term enters training only
  through its gradient, see ``mtp_loss.inject_mtp_loss``). With metrics, forward also computes the loss and the
  greedy ids: four matmuls.
- logits kept (the main loss, by default when they are 16-bit): the main loss always computes its per-token values
  in forward (Megatron logs the lm loss every step, and its backward scales each token by its own gradient, known
  only then). Recomputing would make that four matmuls per chunk; instead forward keeps every chunk's logits in
  the matmul's dtype ([n, V/tp], bf16 in bf16 training: half the bytes of the fp32 softmax Megatron-Core's
  cross-entropy keeps) with each token's max and sum of exponentials, and backward remakes dL/dlogits from them,
  chunk by chunk, bit for bit as recomputing would: three matmuls. fp32 logits are recomputed by default
  (keeping them would hold as much as the plain path).

Where ``dL/dW`` goes: with gradient-accumulation fusion and Megatron DDP's ``main_grad`` on the weight (the
condition of Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``), it is added into ``main_grad``
with the same fused kernel, ``grad_added_to_main_grad`` is set and no gradient is returned (None), so DDP's hook
(which then ignores ``param.grad``) loses nothing. Otherwise it is returned through autograd. Returning None, not a
zero stand-in, matters for memory: GPTModel's output layer uses the same weight in the same backward and returns
Megatron's dummy weight gradient (TransformerEngine's one cached buffer on GPU); any second gradient for the weight
would make autograd sum the two into a new ``[V/tp, h]`` tensor. That dummy is also what keeps ``param.grad`` set
for DDP's hook under ``overlap_grad_reduce`` (which asserts it). When the main loss is chunked too, that output
layer never runs: the main loss's call then returns Megatron's dummy itself (``weight_grad_stand_in``), and the
depths still return None, so the weight gets exactly one gradient; or None too where DDP does not overlap its
reduction (``MTPConfig.ddp_overlaps_grad_reduce``), so the dummy is never made. (A broadcast zero,
``zeros(()).expand(...)``, would not save the buffer: autograd copies a first gradient without the weight's strides
into a new tensor.)

Which variant for a depth (``grad_in_forward=None``, the default): without metrics, recompute. With metrics
(:func:`gradients_in_forward`): with ``main_grad``, recompute, adding each chunk's ``dL/dW`` straight into
``main_grad`` in backward, so no weight-sized buffer exists (``dL/dW`` cannot go there in forward: the incoming
gradient is not known yet). Without it, both variants make one fp32 ``[V/tp, h]`` buffer per depth: recomputing
makes it in its own backward, after the main head's logits are freed, and keeps only the input until then;
keeping gradients from forward holds it and ``dL/dh`` through the main head's forward and backward, for one
matmul less per chunk. That is chosen where what it keeps (``4 V/tp h`` bytes plus ``n h`` input-sized elements)
is no more than the fp32 logits ``[n, V/tp]`` the plain path would keep for the depth, i.e. roughly where
hidden < tokens.

Peak memory: one chunk's fp32 logits (plus the kept gradients or logits) instead of every token's fp32 logits
and softmax. The tensor-parallel gradient reduction of ``h`` is left to the same region functions a
``ColumnParallelLinear`` uses (all-reduce, or reduce-scatter under sequence parallelism).
"""

from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_mtp.loss.metrics import vocab_slice_start
from megatron_mtp.main_grad import add_weight_grad_fp32, weight_grad_in_main_grad
from megatron_mtp.loss.mtp_loss import DepthLoss, OutputHead


def chunked_token_loss(
    hidden_states: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor,
    want_predictions: bool,
    chunk_size: int,
    weight_grad_stand_in: bool = True,
    recompute_logits: Optional[bool] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The main next-token loss as ``GPTModel.compute_language_model_loss`` returns it, chunked.

    Args:
        hidden_states: the decoder output h_0, [s, b, h] ([s/tp, b, h] under sequence parallelism).
        labels: [b, s] global ids.
        want_predictions: also return the greedy ids (for the MTP acceptance metrics against the main model).
        weight_grad_stand_in: with the weight gradient added into ``main_grad``, return Megatron's dummy for the
            weight (False: None; safe only without overlapped DDP reduction, ``MTPConfig.ddp_overlaps_grad_reduce``).
        recompute_logits: True: backward recomputes each chunk's logits (four matmuls per chunk, nothing
            vocabulary-sized kept); False: forward keeps every chunk's logits in the matmul's dtype for backward
            (three matmuls, [s*b, V/tp] kept); None: keep them when that dtype is 16-bit (half the bytes of the
            fp32 softmax the plain path keeps), recompute them when it is fp32 (keeping would save nothing).
    Returns:
        per-token loss [b, s] fp32, unmasked (the loss function masks it; its backward takes a per-token gradient),
        and the greedy ids [b, s] or None.
    """
    x, weight, into_main_grad, (seq_len, batch) = _prepare(hidden_states, head)
    if recompute_logits is None:
        recompute_logits = torch.promote_types(x.dtype, weight.dtype).itemsize >= 4
    plan = _Plan(
        head.tp_group, chunk_size, want_stats=want_predictions, into_main_grad=into_main_grad,
        weight_grad_stand_in=weight_grad_stand_in, keep_logits=not recompute_logits,
    )
    token_loss, predictions = ChunkedVocabParallelCrossEntropy.apply(x, weight, labels.t().reshape(-1), None, plan)
    predictions = predictions.view(seq_len, batch).t() if want_predictions else None
    return token_loss.view(seq_len, batch).t().contiguous(), predictions


def chunked_depth_loss(
    hidden_states: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    want_stats: bool,
    chunk_size: int,
    grad_in_forward: Optional[bool] = None,
) -> DepthLoss:
    """Drop-in for ``mtp_loss.plain_depth_loss``: same loss, gradients and metrics, chunked.

    Args:
        hidden_states: h_k, [s, b, h] ([s/tp, b, h] under sequence parallelism).
        labels, loss_mask: already rolled for this depth, [b, s].
        want_stats: compute the loss value and the greedy ids in forward, for the metrics. Without it and with
            the logits recomputed in backward, forward only saves the input and backward makes the loss's
            gradients in one pass (three matmuls per chunk); the returned loss value is then NaN.
        grad_in_forward: keep the gradients from forward (True) or recompute the logits in backward (False);
            None: recompute when no stats are wanted, else choose by :func:`gradients_in_forward`.
    """
    x, weight, into_main_grad, (seq_len, batch) = _prepare(hidden_states, head)
    if grad_in_forward is None:
        grad_in_forward = want_stats and gradients_in_forward(
            x.size(0), x.size(1), weight.size(0), x.element_size(), into_main_grad
        )
    plan = _Plan(head.tp_group, chunk_size, grad_in_forward, want_stats, into_main_grad)
    loss_sum, predictions = ChunkedVocabParallelCrossEntropy.apply(
        x, weight, labels.t().reshape(-1), loss_mask.t().reshape(-1).to(torch.float32), plan
    )
    return DepthLoss(loss_sum, predictions.view(seq_len, batch).t() if want_stats else None)


def _prepare(hidden_states: torch.Tensor, head: OutputHead):
    """The output layer's weight and whether its gradient goes into ``main_grad``, and the input as every rank of
    the tensor-parallel group needs it: [s*b, h] (gathered under sequence parallelism), with [s, b]."""
    output_layer = head.output_layer
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError("the chunked loss supports output layers without bias only")
    weight = head.weight if head.weight is not None else output_layer.weight
    into_main_grad = _writes_main_grad(output_layer, weight)
    tp_group = head.tp_group
    if getattr(output_layer, "sequence_parallel", False):
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
    elif tp_group is not None and dist.get_world_size(tp_group) > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    seq_len, batch, hidden = hidden_states.shape
    return hidden_states.reshape(seq_len * batch, hidden), weight, into_main_grad, (seq_len, batch)


def chunked(chunk_size: int, grad_in_forward: Optional[bool] = None):
    """``chunked_depth_loss`` with its settings bound, for ``mtp_loss(depth_loss=...)``."""
    return partial(chunked_depth_loss, chunk_size=chunk_size, grad_in_forward=grad_in_forward)


def gradients_in_forward(tokens: int, hidden: int, vocab_slice: int, input_bytes: int, into_main_grad: bool) -> bool:
    """True: keep ``dL/dh`` and ``dL/dW`` from forward; False: recompute the logits in backward (module docstring).

    Args:
        tokens: n, the rows of the depth's input (after the sequence-parallel gather); hidden: h.
        vocab_slice: V/tp; input_bytes: bytes per element of the input.
        into_main_grad: the weight gradient goes into Megatron DDP's ``main_grad``.
    """
    if into_main_grad:
        return False
    kept = 4 * vocab_slice * hidden + input_bytes * tokens * hidden
    return kept <= 4 * tokens * vocab_slice


@dataclass(frozen=True)
class _Plan:
    """How :class:`ChunkedVocabParallelCrossEntropy` runs: settings, no tensors.

    tp_group: the vocabulary's tensor-parallel group (None: one rank). grad_in_forward: keep ``dL/dh`` and ``dL/dW``
    from forward (masked-sum loss only). want_stats: compute the loss value and the greedy ids in forward.
    into_main_grad: add ``dL/dW`` into ``weight.main_grad``; weight_grad_stand_in: then return Megatron's dummy
    gradient for the weight rather than None. keep_logits: forward keeps every chunk's logits for backward
    instead of backward recomputing them (per-token loss; see :func:`chunked_token_loss`).
    """

    tp_group: Optional[dist.ProcessGroup]
    chunk_size: int
    grad_in_forward: bool = False
    want_stats: bool = False
    into_main_grad: bool = False
    weight_grad_stand_in: bool = False
    keep_logits: bool = False


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token ``CE(x[t] @ W^T, labels[t])`` over a vocabulary split across ``plan.tp_group``, or its masked sum.

    forward(x [n, h], weight [V/tp, h], labels [n] global ids, mask [n] fp32 or None, plan: _Plan) ->
        (mask given: ``sum_t mask[t] * CE[t]``, scalar fp32; mask None: ``CE`` [n] fp32,
         predictions [n] global greedy ids, or an empty tensor when not requested)

    Gradients kept from forward need the scalar (masked-sum) form: a per-token incoming gradient is known only in
    backward. With ``into_main_grad`` the weight gradient is added into ``weight.main_grad`` as Megatron's
    ``LinearWithGradAccumulationAndAsyncCommunication`` does under gradient-accumulation fusion (same kernel,
    ``grad_added_to_main_grad`` set), and the returned weight gradient is Megatron's dummy with
    ``weight_grad_stand_in``, else None (module docstring).
    """

    @staticmethod
    def forward(ctx, x, weight, labels, mask, plan: _Plan):
        if plan.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {plan.chunk_size}")
        per_token = mask is None
        if per_token and plan.grad_in_forward:
            raise ValueError("gradients kept from forward need the masked-sum loss (a scalar incoming gradient)")
        if plan.keep_logits and plan.grad_in_forward:
            raise ValueError("keep the logits or the gradients from forward, not both")
        vocab_start = vocab_slice_start(weight, plan.tp_group)
        backward_follows = any(ctx.needs_input_grad[:2])
        keep_grads = plan.grad_in_forward and backward_follows
        grad_x = torch.empty_like(x) if keep_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if keep_grads else None
        value_in_backward = backward_follows and not keep_grads and not plan.want_stats and not per_token
        kept = None
        if plan.keep_logits and backward_follows and not value_in_backward:
            logits_dtype = torch.promote_types(x.dtype, weight.dtype)
            kept = _KeptLogits.empty(x.size(0), weight.size(0), logits_dtype, x.device)
        predictions = torch.empty(x.size(0) if plan.want_stats else 0, dtype=torch.long, device=x.device)
        loss = torch.empty(x.size(0), dtype=torch.float32, device=x.device) if per_token else (
            torch.full((), torch.nan if value_in_backward else 0.0, dtype=torch.float32, device=x.device)
        )
        for start in range(0, 0 if value_in_backward else x.size(0), plan.chunk_size):
            rows = slice(start, start + plan.chunk_size)
            if kept is None:
                chunk = _ChunkLogits(x[rows] @ weight.t(), labels[rows], vocab_start, plan.tp_group, plan.want_stats)
            else:
                logits = torch.matmul(x[rows], weight.t(), out=kept.logits[rows])
                chunk = _ChunkLogits(
                    logits.to(torch.float32, copy=True), labels[rows], vocab_start, plan.tp_group, plan.want_stats
                )
                kept.record(rows, chunk)
            if per_token:
                loss[rows] = chunk.token_loss
            else:
                loss += (chunk.token_loss * mask[rows]).sum()
            if plan.want_stats:
                predictions[rows] = chunk.predictions
            if keep_grads:
                _backpropagate_chunk(chunk, mask[rows], x, weight, rows, grad_x, _adder(grad_weight))
            del chunk  # its [c, V/tp] logits, before the next chunk makes its own
        ctx.plan, ctx.vocab_start, ctx.kept_grads, ctx.consumed = plan, vocab_start, keep_grads, False
        # An attribute, not a saved tensor (as in Megatron's linear): main_grad changes in place before backward.
        ctx.main_grad = weight.main_grad if plan.into_main_grad else None
        if keep_grads:
            ctx.save_for_backward(grad_x, grad_weight, weight)
        elif kept is None:
            ctx.save_for_backward(x, weight, labels, mask)
        else:
            ctx.save_for_backward(x, weight, labels, mask, kept.logits, kept.row_max, kept.row_sum_exp)
        ctx.mark_non_differentiable(predictions)
        return loss, predictions

    @staticmethod
    def backward(ctx, grad_loss, _grad_predictions):
        plan = ctx.plan
        if ctx.kept_grads:
            # Scaled in place to save a weight-sized buffer, so a second backward would be wrong: refuse it.
            if ctx.consumed:
                raise RuntimeError("the chunked loss keeps its gradients for one backward pass (no retain_graph)")
            ctx.consumed = True
            grad_x, grad_weight, weight = ctx.saved_tensors
            grad_x.mul_(grad_loss.to(grad_x.dtype))
            grad_weight.mul_(grad_loss)
            if ctx.main_grad is None:
                return grad_x, grad_weight.to(weight.dtype), None, None, None
            ctx.main_grad.add_(grad_weight)
            return grad_x, weight_grad_in_main_grad(weight, grad_x.dtype, plan.weight_grad_stand_in), None, None, None
        x, weight, labels, mask, *kept = ctx.saved_tensors
        kept = _KeptLogits(*kept) if kept else None
        grad_x = torch.empty_like(x)
        if ctx.main_grad is None:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            add_weight_grad = _adder(grad_weight)
        else:
            add_weight_grad = _fused_adder(ctx.main_grad)
        for start in range(0, x.size(0), plan.chunk_size):
            rows = slice(start, start + plan.chunk_size)
            if kept is None:
                chunk = _ChunkLogits(x[rows] @ weight.t(), labels[rows], ctx.vocab_start, plan.tp_group, False)
            else:
                chunk = kept.chunk(rows, labels[rows], ctx.vocab_start)
            scale = grad_loss[rows] if mask is None else mask[rows] * grad_loss
            _backpropagate_chunk(chunk, scale, x, weight, rows, grad_x, add_weight_grad)
            del chunk
        if ctx.main_grad is None:
            return grad_x, grad_weight.to(weight.dtype), None, None, None
        return grad_x, weight_grad_in_main_grad(weight, x.dtype, plan.weight_grad_stand_in), None, None, None


def _writes_main_grad(output_layer, weight) -> bool:
    """Megatron's linear layers' condition for adding the weight gradient straight into ``main_grad``."""
    if not getattr(output_layer, "gradient_accumulation_fusion", False):
        return False
    if hasattr(weight, "__fsdp_param__"):  # Megatron-FSDP makes main_grad per backward and overwrites it
        raise NotImplementedError(
            "the chunked loss does not support Megatron-FSDP with gradient_accumulation_fusion; "
            "use --mtp-loss-implementation plain and --main-loss-implementation plain, "
            "or --no-gradient-accumulation-fusion"
        )
    return hasattr(weight, "main_grad")


class _ChunkLogits:
    """One chunk's logits reduced over the vocabulary slices: per-token CE, greedy ids, and dCE/dlogits.

    logits: [c, V/tp] (``x[rows] @ W^T``), labels: [c] global ids. Holds one fp32 [c, V/tp] buffer, reused in
    place: the logits themselves when they are fp32.
    """

    def __init__(self, logits, labels, vocab_start, tp_group, want_predictions: bool):
        shifted = logits.float()
        if want_predictions:
            local_max, local_ids = shifted.max(dim=-1)
        else:
            local_max = shifted.amax(dim=-1)
        self.global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, tp_group)
        if want_predictions:
            # Lowest global id among the slices that hold the maximum, as a full-vocabulary argmax would give.
            candidates = torch.where(
                local_max == self.global_max,
                local_ids + vocab_start,
                torch.full_like(local_ids, torch.iinfo(torch.long).max),
            )
            self.predictions = _all_reduce(candidates, dist.ReduceOp.MIN, tp_group)
        shifted -= self.global_max.unsqueeze(-1)
        self._set_labels(labels, vocab_start, shifted.size(-1))
        target = shifted.gather(-1, self.local_labels.unsqueeze(-1)).squeeze(-1) * self.owns_label
        self.exp = shifted.exp_()
        sums = _all_reduce(torch.stack((self.exp.sum(dim=-1), target)), dist.ReduceOp.SUM, tp_group)
        self.sum_exp = sums[0]
        self.token_loss = torch.log(self.sum_exp) - sums[1]  # [c]

    @classmethod
    def from_kept(cls, logits, global_max, sum_exp, labels, vocab_start) -> "_ChunkLogits":
        """The chunk as forward left it, from its kept logits [c, V/tp] and each token's global max and sum of
        exponentials [c]: no matmul, no communication (``grad_logits`` only)."""
        chunk = cls.__new__(cls)
        chunk.global_max, chunk.sum_exp = global_max, sum_exp
        chunk.exp = logits.to(torch.float32, copy=True).sub_(global_max.unsqueeze(-1)).exp_()
        chunk._set_labels(labels, vocab_start, logits.size(-1))
        return chunk

    def _set_labels(self, labels, vocab_start, vocab_slice) -> None:
        local_labels = labels - vocab_start
        self.owns_label = (local_labels >= 0) & (local_labels < vocab_slice)
        self.local_labels = torch.where(self.owns_label, local_labels, torch.zeros_like(local_labels))

    def grad_logits(self, scale: torch.Tensor) -> torch.Tensor:
        """scale[t] * (softmax - onehot(label)) for this slice, [c, V/tp] fp32 (the logits buffer, overwritten and
        handed over: the chunk keeps no reference, so casting it to a 16-bit dtype frees the fp32 buffer).

        scale: [c], the loss mask (times the incoming gradient when recomputing in backward).
        """
        grad, self.exp = self.exp, None
        grad.mul_((scale / self.sum_exp).unsqueeze(-1))
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, self.local_labels] -= scale * self.owns_label
        return grad


class _KeptLogits:
    """Every chunk's logits [n, V/tp] in the matmul's dtype, kept from forward, with each token's global max and
    sum of exponentials [n] fp32: backward remakes each chunk's dL/dlogits from them, bit for bit as recomputing
    would, without the matmul."""

    def __init__(self, logits, row_max, row_sum_exp):
        self.logits, self.row_max, self.row_sum_exp = logits, row_max, row_sum_exp

    @classmethod
    def empty(cls, rows: int, vocab_slice: int, dtype: torch.dtype, device) -> "_KeptLogits":
        per_row = torch.empty(2, rows, dtype=torch.float32, device=device)
        return cls(torch.empty(rows, vocab_slice, dtype=dtype, device=device), per_row[0], per_row[1])

    def record(self, rows: slice, chunk: _ChunkLogits) -> None:
        self.row_max[rows], self.row_sum_exp[rows] = chunk.global_max, chunk.sum_exp

    def chunk(self, rows: slice, labels, vocab_start) -> _ChunkLogits:
        return _ChunkLogits.from_kept(
            self.logits[rows], self.row_max[rows], self.row_sum_exp[rows], labels, vocab_start
        )


def _backpropagate_chunk(chunk, scale, x, weight, rows, grad_x, add_weight_grad) -> None:
    """From one chunk's dL/dlogits [c, V/tp] (``chunk.grad_logits(scale)``, fp32, cast to x's dtype with the fp32
    buffer freed): grad_x[rows] = it @ W ([c, h]), and its transpose @ x[rows] ([V/tp, h]) to the weight gradient
    through ``add_weight_grad(x[rows], dL/dlogits)``."""
    grad_logits = chunk.grad_logits(scale).to(x.dtype)
    grad_x[rows] = grad_logits @ weight
    add_weight_grad(x[rows], grad_logits)


def _adder(grad_weight: torch.Tensor):
    """Accumulates into an fp32 buffer, in place (the chunk's inputs are cast, not the product)."""
    return lambda input, grad_output: add_weight_grad_fp32(grad_weight, input, grad_output)


def _fused_adder(main_grad: torch.Tensor):
    """Accumulates into ``main_grad`` with the kernel Megatron's linear layers use (apex; the CPU bridge's
    stand-in on CPU), picked by ``main_grad``'s dtype as they pick it."""
    import fused_weight_gradient_mlp_cuda

    if main_grad.dtype == torch.float32:
        kernel = fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32
    elif main_grad.dtype in (torch.float16, torch.bfloat16):
        kernel = fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16
    else:
        raise RuntimeError(f"gradient accumulation fusion does not support main_grad of dtype {main_grad.dtype}")
    return lambda input, grad_output: kernel(input, grad_output, main_grad)


def _all_reduce(tensor: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)
    return tensor
