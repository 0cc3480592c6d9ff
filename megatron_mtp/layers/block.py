"""The MTP block: D sequential depths or D parallel heads, registered as ``mtp.layers.{k-1}``."""

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers.sequence_layout import SequenceLayout


@dataclass
class MTPBlockSubmodules:
    layer: Union[ModuleSpec, type] = None
    """Spec of one depth/head; built ``mtp_config.num_layers`` times."""


class MTPBlock(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: MTPBlockSubmodules,
        mtp_config: MTPConfig,
        pg_collection: ProcessGroupCollection,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.mode = mtp_config.mode
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layers = torch.nn.ModuleList(
            build_module(submodules.layer, config=config, depth=k, pg_collection=pg_collection, vp_stage=vp_stage)
            for k in range(1, mtp_config.num_layers + 1)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        token_embeddings: Optional[torch.Tensor] = None,
        tail_embeddings: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> List[torch.Tensor]:
        """
        Args:
            hidden_states: h_0, the decoder's final-normed output, [s, b, h] ([s/tp, b, h] with SP; s is this
                context-parallel rank's two chunks of the sequence under CP).
            token_embeddings: the embedding of the un-rolled input ids, shaped like ``hidden_states`` (sequential
                depths only). Depth k reads it rolled left by k, the embedding of token t+k at position t.
            tail_embeddings: what depth k reads at the last k positions, past the sequence end, shaped like
                ``hidden_states``, without gradient: Megatron-Core's MTP embeds token 0 at position 0 there.
            packed_seq_params: Megatron-Core's ``PackedSeqParams`` of a packed (THD, b=1) micro-batch: the layers
                attend within each document, and depth k reads the tail past each document's end.
        Returns:
            [h_1, ..., h_D], each shaped like ``hidden_states``; h_k feeds the prediction of token t+k+1.
        """
        layer_kwargs = dict(
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            packed_seq_params=packed_seq_params,
        )
        outputs = []
        if self.mode == "parallel":
            for head in self.layers:
                outputs.append(head(hidden_states, attention_mask, **layer_kwargs))
            return outputs
        # One embedding rolled per depth instead of a lookup of rolled ids per depth (Megatron-Core's way): the
        # same values everywhere, and no dense [V/tp, h] embedding gradient per depth. The positions past the end
        # have no target; their values still reach MoE routers' aux losses, whose gradient Megatron-Core sends
        # into token 0's embedding row and this does not (see docs/design.md).
        if self.config.sequence_parallel:  # each rank rolls the whole sequence and keeps its own slice
            token_embeddings = gather_from_sequence_parallel_region(
                token_embeddings, tensor_parallel_output_grad=False, group=self.tp_group
            )
            tail_embeddings = gather_from_sequence_parallel_region(tail_embeddings, group=self.tp_group)  # no grad
        layout = SequenceLayout.of(packed_seq_params, self.cp_group)
        depths = range(1, len(self.layers) + 1)
        all_rolled = layout.rolls(token_embeddings, depths, dim=0, fill=tail_embeddings)
        previous = hidden_states
        for layer, rolled in zip(self.layers, all_rolled, strict=True):
            if self.config.sequence_parallel:
                rolled = scatter_to_sequence_parallel_region(rolled, group=self.tp_group)
            previous = layer(previous, rolled, attention_mask, **layer_kwargs)
            outputs.append(previous)
        return outputs

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        # Each layer describes its own TP sharding; Megatron's fallback for the plain ModuleList would mark
        # every tensor inside as replicated and save TP rank 0's shards as if they were whole tensors.
        state = {}
        for index, layer in enumerate(self.layers):
            state.update(layer.sharded_state_dict(f"{prefix}layers.{index}.", sharded_offsets, metadata))
        return state
