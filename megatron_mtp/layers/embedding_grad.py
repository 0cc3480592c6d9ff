"""Word-embedding lookup whose weight gradient goes straight into Megatron DDP's ``main_grad``.

Megatron-Core's ``VocabParallelEmbedding`` looks tokens up with ``F.embedding``, whose backward makes a dense
``[V/tp, h]`` weight gradient in ``param.grad`` for DDP's hook to add into ``main_grad``: at the end of backward,
beside the weights, their ``main_grad`` and the dummy gradient of the fused output layer, that tensor sets the
step's peak (1 GB at hidden 2048, V=128k, fp32). Under gradient-accumulation fusion (``main_grad`` present, as
Megatron's linear layers require) :class:`MainGradVocabParallelEmbedding` adds the output gradient's rows into
``main_grad`` instead, ``main_grad[ids[t]] += grad_output[t]`` (fp32, deterministic ``index_put_`` with
accumulate), and hands autograd Megatron's dummy or None as ``megatron_mtp/main_grad.py`` describes.

Rows of tokens outside this rank's vocabulary slice are zeroed in forward (as Megatron-Core does), so their
output gradient is zero and they add nothing (their lookup index is 0, like Megatron-Core's).

Which user returns the dummy: a stage whose output layer reads this same weight (tied embeddings on the last
stage: at PP=1 the embedding, at PP>1 the MTP stage's embedding copy) gets the dummy from that output layer (or
from the chunked main loss standing in for it), so the lookup returns None; elsewhere the lookup is the weight's
only user and returns the dummy, or None where DDP does not overlap its reduction
(``MTPConfig.ddp_overlaps_grad_reduce``). One forward makes one lookup with gradient (sequential MTP at PP=1 rolls the
decoder's own input; the tail embeddings are looked up without gradient). A caller that makes two (e.g. passes its
own ``decoder_input`` to a PP=1 sequential MTP model) still gets exact gradients, at the cost of autograd summing
two dummies into a weight-sized tensor.

Without fusion, without ``main_grad`` (no Megatron DDP, Megatron-FSDP), without gradient, or where 0.19 gathers
the weight in each forward, the lookup is Megatron-Core's own.
"""

from typing import Optional

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from megatron_mtp.compat import embedding_weight_gathered_per_forward
from megatron_mtp.main_grad import weight_grad_in_main_grad


def fuse_embedding_weight_grad(
    embedding: VocabParallelEmbedding,
    gradient_accumulation_fusion: bool,
    output_layer_reads_weight: bool,
    ddp_overlaps_grad_reduce: bool = True,
) -> None:
    """Make ``embedding`` (a built ``VocabParallelEmbedding``) a :class:`MainGradVocabParallelEmbedding` in place.

    Args:
        gradient_accumulation_fusion: ``TransformerConfig.gradient_accumulation_fusion``.
        output_layer_reads_weight: this stage's output layer uses the same weight (tied embeddings on the stage
            with the output layer); it then returns the dummy gradient, and the lookup None.
        ddp_overlaps_grad_reduce: ``MTPConfig.ddp_overlaps_grad_reduce``; False: the lookup always returns None.
    """
    if not isinstance(embedding, VocabParallelEmbedding):
        raise TypeError(f"expected a VocabParallelEmbedding, got {type(embedding).__name__}")
    embedding.__class__ = MainGradVocabParallelEmbedding
    embedding.gradient_accumulation_fusion = gradient_accumulation_fusion
    embedding.returns_weight_grad_stand_in = ddp_overlaps_grad_reduce and not output_layer_reads_weight


class MainGradVocabParallelEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` whose lookup adds its weight gradient into ``weight.main_grad`` under
    gradient-accumulation fusion (module docstring). Made from a built one by :func:`fuse_embedding_weight_grad`.

    forward(input_ [b, s] global ids) -> [b, s, h] (reduced over the tensor-parallel group), or [s/tp, b, h] with
    ``reduce_scatter_embeddings`` (sequence parallelism), as ``VocabParallelEmbedding``.
    """

    gradient_accumulation_fusion: bool = False
    returns_weight_grad_stand_in: bool = True

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if not self._adds_into_main_grad():
            return super().forward(input_)
        split = self.tp_group.size() > 1
        if split:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = torch.where(outside, 0, input_ - self.vocab_start_index)
        else:
            local_ids = input_
        output = _LookupIntoMainGrad.apply(local_ids, self.weight, self.returns_weight_grad_stand_in)
        if split:
            output = output.masked_fill_(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            output = output.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(output, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output, group=self.tp_group)

    def _adds_into_main_grad(self) -> bool:
        weight = self.weight
        return (
            self.gradient_accumulation_fusion
            and hasattr(weight, "main_grad")
            and not hasattr(weight, "__fsdp_param__")  # Megatron-FSDP makes main_grad per backward
            and torch.is_grad_enabled()
            and weight.requires_grad
            and not embedding_weight_gathered_per_forward(self)
        )


class _LookupIntoMainGrad(torch.autograd.Function):
    """``weight[ids]``; backward adds the output gradient's rows into ``weight.main_grad`` and returns Megatron's
    dummy weight gradient (``stand_in``) or None.

    forward(ids [...] local row indices, weight [V/tp, h], stand_in: bool) -> [..., h]
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, stand_in: bool) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.stand_in = weight, stand_in
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = weight.main_grad
        rows = grad_output.reshape(-1, grad_output.size(-1)).to(main_grad.dtype)  # [tokens, h]
        main_grad.index_put_((ids.reshape(-1),), rows, accumulate=True)
        grad_weight: Optional[torch.Tensor] = weight_grad_in_main_grad(weight, grad_output.dtype, ctx.stand_in)
        return None, grad_weight, None
