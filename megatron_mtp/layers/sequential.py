"""DeepSeek-V3 sequential MTP depth.

Depth k at position t combines the previous depth's state for token t with the embedding of token t+k:

    h_k = final_layernorm(TransformerLayer(eh_proj(cat[enorm(embed(tokens rolled k)), hnorm(h_{k-1})])))

h_0 is the decoder's final-normed output. The transformer layer uses the rotary embedding and attention mask
of the un-rolled sequence (Megatron-Core's choice). Parameter names match Megatron-Core's MTP layer of the same
release (``enorm``, ``hnorm``, ``eh_proj``, ``transformer_layer`` or ``mtp_model_layer`` (see ``compat``),
``final_layernorm``) so checkpoints move between the two.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core import tensor_parallel
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor

from megatron_mtp.compat import MTPLayerModule


@dataclass
class SequentialMTPLayerSubmodules:
    enorm: Union[ModuleSpec, type] = None
    hnorm: Union[ModuleSpec, type] = None
    eh_proj: Union[ModuleSpec, type] = None
    transformer_layer: Union[ModuleSpec, type] = None
    final_layernorm: Union[ModuleSpec, type] = None


class SequentialMTPLayer(MTPLayerModule):
    """One sequential MTP depth. Lives on the last pipeline stage."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SequentialMTPLayerSubmodules,
        depth: int,
        pg_collection: ProcessGroupCollection,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.depth = depth
        self.tp_group = pg_collection.tp
        norm_args = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.enorm = build_module(submodules.enorm, **norm_args)
        self.hnorm = build_module(submodules.hnorm, **norm_args)
        # 2h -> h, split over TP by output columns; gathered back to full h before the transformer layer.
        self.eh_proj = build_module(
            submodules.eh_proj,
            2 * config.hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_group=self.tp_group,
        )
        self._build_inner_layer(submodules.transformer_layer, config, depth, pg_collection, vp_stage)
        self.final_layernorm = build_module(submodules.final_layernorm, **norm_args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_embeddings: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: h_{k-1}, [s, b, h] ([s/tp, b, h] under sequence parallelism).
            token_embeddings: embedding of the tokens rolled left by k, same shape as ``hidden_states``.
            inference_context: this depth's own KV cache (a Megatron-Core static inference context), at
                generation time; its ``sequence_len_offset`` is the position of the first of the s tokens.
            packed_seq_params: a packed (THD) micro-batch's ``PackedSeqParams``, for the transformer layer.
        Returns:
            h_k, same shape as ``hidden_states``.
        """
        rng_context = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        fp8_context = get_fp8_context(self.config) if self.config.fp8 else nullcontext()
        with rng_context:
            with fp8_context:
                combined = torch.cat((self.enorm(token_embeddings), self.hnorm(hidden_states)), dim=-1)
                projected, _ = self.eh_proj(combined)  # [s, b, h/tp]
                projected = gather_from_tensor_model_parallel_region(projected, group=self.tp_group)
                if self.config.sequence_parallel:
                    projected = scatter_to_sequence_parallel_region(projected, group=self.tp_group)
            layer_fp8_context = get_fp8_context(self.config) if self.config.fp8 else nullcontext()
            with layer_fp8_context:
                hidden_states, _ = self.inner_layer(
                    hidden_states=projected,
                    attention_mask=attention_mask,
                    rotary_pos_emb=rotary_pos_emb,
                    rotary_pos_cos=rotary_pos_cos,
                    rotary_pos_sin=rotary_pos_sin,
                    inference_context=inference_context,
                    packed_seq_params=packed_seq_params,
                )
        hidden_states = self.final_layernorm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
