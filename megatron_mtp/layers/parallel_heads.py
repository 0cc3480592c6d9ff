"""Parallel MTP heads (Meta, "Better & Faster Large Language Models via Multi-token Prediction").

Head 0 is the model's own next-token output: the decoder (its last layer and final layernorm) and the
output layer. Heads k = 1..D sit beside it on the decoder's final-normed output h_0 (the trunk):

    h_k = final_layernorm_k(TransformerLayer_k(h_0)),   logits_k = output_layer(h_k)

and head k at position t predicts token t+k+1. Heads share the output layer (unembedding) and nothing else,
so each gets an independent gradient. Keeping head 0 as the plain model leaves the next-token path of an
existing checkpoint untouched when heads are added.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor

from megatron_mtp.compat import MTPLayerModule, untrack_moe_router


@dataclass
class ParallelMTPHeadSubmodules:
    transformer_layer: Union[ModuleSpec, type] = None
    final_layernorm: Union[ModuleSpec, type] = None


class ParallelMTPHead(MTPLayerModule):
    """One parallel MTP head. Lives on the last pipeline stage."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: ParallelMTPHeadSubmodules,
        depth: int,
        pg_collection: ProcessGroupCollection,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.depth = depth
        self._build_inner_layer(submodules.transformer_layer, config, depth, pg_collection, vp_stage)
        _untrack_aux_losses(self.inner_layer, config)
        self.final_layernorm = build_module(
            submodules.final_layernorm,
            config=config,
            hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon,
        )

    def forward(
        self,
        trunk_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """trunk_states: h_0, [s, b, h] ([s/tp, b, h] under sequence parallelism). Returns h_k, same shape.

        inference_context: this head's own KV cache at generation time (see ``SequentialMTPLayer.forward``);
        packed_seq_params: a packed (THD) micro-batch's ``PackedSeqParams``, for the transformer layer."""
        hidden_states, _ = self.inner_layer(
            hidden_states=trunk_states,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
        )
        hidden_states = self.final_layernorm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)


def _untrack_aux_losses(layer, config: TransformerConfig) -> None:
    """Keep an MoE head's router out of Megatron's per-layer aux-loss log (its losses still train the head).

    Megatron-Core sizes that log ``num_layers + mtp_num_layers``, and ``mtp_num_layers`` stays unset for parallel
    heads (it would make Megatron-Core keep a word-embedding copy they never use), so a head has no slot in it.
    """
    if config.mtp_num_layers is not None:
        return
    for module in layer.modules():  # one layer, or each layer of a hybrid stack
        router = getattr(getattr(module, "mlp", None), "router", None)
        if router is not None:
            untrack_moe_router(router)
