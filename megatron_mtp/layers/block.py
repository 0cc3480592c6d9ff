"""The MTP block: D sequential depths or D parallel heads, registered as ``mtp.layers.{k-1}``."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers.roll import roll_left


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
        self.layers = torch.nn.ModuleList(
            build_module(submodules.layer, config=config, depth=k, pg_collection=pg_collection, vp_stage=vp_stage)
            for k in range(1, mtp_config.num_layers + 1)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        embedding: Optional[Callable] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        rotary_pos_cos: Optional[torch.Tensor] = None,
        rotary_pos_sin: Optional[torch.Tensor] = None,
    ) -> List[torch.Tensor]:
        """
        Args:
            hidden_states: h_0, the decoder's final-normed output, [s, b, h] ([s/tp, b, h] with SP).
            input_ids, position_ids: [b, s], un-rolled; needed by sequential depths only.
            embedding: the model's word(+position) embedding, ``embedding(input_ids=, position_ids=) -> [s, b, h]``.
        Returns:
            [h_1, ..., h_D], each shaped like ``hidden_states``; h_k feeds the prediction of token t+k+1.
        """
        rotary = dict(rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin)
        outputs = []
        if self.mode == "parallel":
            for head in self.layers:
                outputs.append(head(hidden_states, attention_mask, **rotary))
            return outputs
        previous = hidden_states
        for depth, layer in enumerate(self.layers, start=1):
            token_embeddings = embedding(
                input_ids=roll_left(input_ids, depth),
                position_ids=None if position_ids is None else roll_left(position_ids, depth),
            )
            previous = layer(previous, token_embeddings, attention_mask, **rotary)
            outputs.append(previous)
        return outputs

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        # Each layer describes its own TP sharding; Megatron's fallback for the plain ModuleList would mark
        # every tensor inside as replicated and save TP rank 0's shards as if they were whole tensors.
        state = {}
        for index, layer in enumerate(self.layers):
            state.update(layer.sharded_state_dict(f"{prefix}layers.{index}.", sharded_offsets, metadata))
        return state
