"""GPT with multi-token prediction on Megatron-Core's ``GPTModel``.

The decoder, embedding, rotary embedding and output layer are Megatron-Core's. MTP modules live on the last
pipeline stage (``post_process``). Sequential MTP embeds rolled tokens with that stage's copy of the
vocab-parallel word embedding, which Megatron-Core keeps equal to stage 0's through the embedding group
(``TransformerConfig.mtp_num_layers`` tells it to); parallel heads need no embedding. All depths share the
output layer (tied to the embedding or not).

Training (labels given): ``forward`` returns the per-token next-token loss [b, s], exactly as ``GPTModel``
does, with the MTP term riding along into backward (see ``loss/mtp_loss.py``). Per-depth losses and
acceptance counts go to the ``MTPStats`` passed as ``mtp_stats``. Without labels it returns the main
logits [b, s, V] only; MTP runs in training, and in eval when ``compute_mtp=True``.
"""

from typing import Literal, Optional

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss.chunked import chunked
from megatron_mtp.loss.latent import LatentTargets
from megatron_mtp.loss.metrics import MTPStats, count_main_agreement, vocab_parallel_argmax
from megatron_mtp.loss.mtp_loss import MTPLossResult, OutputHead, inject_mtp_loss, mtp_loss, plain_depth_loss


class MTPGPTModel(GPTModel):
    """``GPTModel`` plus an MTP block built from ``mtp_block_spec`` (see ``layers.get_mtp_block_spec``).

    Args beyond ``GPTModel``'s:
        mtp_config: the MTP settings; ``config.mtp_num_layers`` must equal ``mtp_config.megatron_mtp_num_layers``.
        mtp_block_spec: required when ``mtp_config.enabled``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        mtp_config: MTPConfig,
        mtp_block_spec: Optional[ModuleSpec] = None,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: Literal["learned_absolute", "rope", "yarn", "none"] = "learned_absolute",
        scatter_embedding_sequence_parallel: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        **gpt_kwargs,
    ):
        _check_configs(config, mtp_config, mtp_block_spec, max_sequence_length, position_embedding_type, gpt_kwargs)
        self._embedding_setup_deferred = True
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            **gpt_kwargs,
        )
        self.mtp_config = mtp_config
        has_mtp = post_process and mtp_config.enabled
        # Megatron-Core's name for "this stage holds MTP and a copy of the word embedding".
        self.mtp_process = has_mtp and mtp_config.mode == "sequential"
        if self.mtp_process and not pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type=position_embedding_type,
                scatter_to_sequence_parallel=scatter_embedding_sequence_parallel,
                tp_group=self.pg_collection.tp,
            )
            if share_embeddings_and_output_weights:
                # The output layer reads the embedding copy above; GPTModel allocated a weight it never uses.
                self.output_layer.weight = None
        if has_mtp and mtp_config.semantic_anchoring_weight and not (
            hasattr(self, "embedding") or share_embeddings_and_output_weights
        ):
            raise ValueError(
                "semantic anchoring needs the word embedding on the last pipeline stage: parallel-heads MTP with "
                "pipeline parallelism has it only when embeddings and output weights are tied"
            )
        if has_mtp:
            self.mtp = build_module(
                mtp_block_spec, config=config, pg_collection=self.pg_collection, vp_stage=vp_stage
            )
        self._embedding_setup_deferred = False
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()
        if self.mtp_process and share_embeddings_and_output_weights and not pre_process:
            # The output layer and the MTP embedding lookups share this stage's embedding copy, as the embedding
            # and output layer share one weight at PP=1, where Megatron-Core marks it so. Unmarked, a fused output
            # layer's grad_added_to_main_grad makes Megatron DDP drop the lookups' param.grad.
            self.shared_embedding_or_output_weight().zero_out_wgrad = True

    def setup_embeddings_and_output_layer(self) -> None:
        # GPTModel.__init__ calls this before the MTP stage's embedding copy exists; run it once that is built.
        if not getattr(self, "_embedding_setup_deferred", False):
            super().setup_embeddings_and_output_layer()

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor],
        decoder_input: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        extra_block_kwargs: Optional[dict] = None,
        runtime_gather_output: Optional[bool] = None,
        *,
        inference_params=None,
        loss_mask: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        mtp_stats: Optional[MTPStats] = None,
        mtp_step: Optional[int] = None,
        compute_mtp: Optional[bool] = None,
    ) -> Tensor:
        """
        Args (beyond ``GPTModel.forward``):
            input_ids, position_ids, labels, loss_mask: [b, s]; the last stage needs them all for MTP.
            mtp_stats: receives this micro-batch's per-depth counts (also computes acceptance metrics).
            mtp_step: training step, selects lambda when ``mtp_config.loss_scaling_schedule`` is set.
            compute_mtp: run MTP (default: in training mode, when labels are given).
        Returns:
            labels given: per-token next-token loss [b, s]; else logits [b, s, V] (V/tp unless gathered).
        """
        if self.config.fine_grained_activation_offloading:
            self.preprocess_for_fine_grained_offloading()
        inference_context = inference_context if inference_context is not None else inference_params
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset, padding_mask = (
            self._preprocess(
                input_ids=input_ids,
                position_ids=position_ids,
                decoder_input=decoder_input,
                inference_context=inference_context,
                packed_seq_params=packed_seq_params,
                padding_mask=padding_mask,
            )[:6]
        )
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
            padding_mask=padding_mask,
            **(extra_block_kwargs or {}),
        )
        if not self.post_process:
            return hidden_states

        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        run_mtp = hasattr(self, "mtp") and labels is not None and (self.training if compute_mtp is None else compute_mtp)
        if run_mtp:
            if loss_mask is None:
                loss_mask = torch.ones_like(labels)
            # Before the main logits exist, so the MTP loss's transient buffers do not add to theirs.
            mtp_result = self._mtp_loss(
                hidden_states, output_weight, labels, loss_mask, mtp_stats is not None, mtp_step,
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                packed_seq_params=packed_seq_params, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            )

        in_inference = inference_context is not None and not self.training
        if in_inference:
            if not runtime_gather_output:
                raise ValueError("inference needs runtime_gather_output=True (full-vocabulary logits)")
            if inference_context.materialize_only_last_token_logits:
                if not inference_context.is_static_batching():
                    raise NotImplementedError("MTPGPTModel supports static-batching inference contexts only")
                hidden_states = hidden_states[-1:]
        logits, _ = self.output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        lm_loss = self.compute_language_model_loss(labels, logits)
        if not run_mtp:
            return lm_loss

        if mtp_stats is not None:
            main_predictions = vocab_parallel_argmax(logits, self.output_layer.tp_group).t()
            mtp_stats.add(count_main_agreement(mtp_result.stats, mtp_result.predictions, main_predictions, loss_mask))
        return inject_mtp_loss(lm_loss, mtp_result.term, loss_mask, self.config.calculate_per_token_loss)

    def _mtp_loss(
        self, hidden_states, output_weight, labels, loss_mask, want_predictions, mtp_step, *, input_ids,
        position_ids, attention_mask, packed_seq_params, **rotary
    ) -> MTPLossResult:
        """Run the MTP block on the decoder output h_0 [s, b, h] and return its loss term and counts."""
        self._check_mtp_inputs(input_ids, labels, loss_mask, packed_seq_params, mtp_step)
        depth_hidden_states = self.mtp(
            hidden_states,
            attention_mask,
            input_ids=input_ids,
            position_ids=position_ids,
            embedding=self.embedding if self.mtp_process else None,
            **rotary,
        )
        config = self.mtp_config
        return mtp_loss(
            depth_hidden_states,
            OutputHead(self.output_layer, output_weight, self.compute_language_model_loss, self.output_layer.tp_group),
            labels,
            loss_mask,
            depth_weights=config.depth_weights(),
            loss_scale=config.loss_scaling_factor if mtp_step is None else config.loss_scale_at(mtp_step),
            per_token_loss=self.config.calculate_per_token_loss,
            depth_loss=self._depth_loss(),
            latent_targets=self._latent_targets(hidden_states) if config.latent_losses else None,
            want_predictions=want_predictions,
        )

    def _depth_loss(self):
        if self.mtp_config.loss_implementation == "plain":
            return plain_depth_loss
        recompute = self.mtp_config.loss_recompute_logits
        return chunked(self.mtp_config.loss_chunk_size, grad_in_forward=None if recompute is None else not recompute)

    def _latent_targets(self, trunk_hidden_states: Tensor) -> LatentTargets:
        embedding_weight = None
        if hasattr(self, "embedding"):
            embedding_weight = self.embedding.word_embeddings.weight
        elif self.share_embeddings_and_output_weights:  # the output layer holds this stage's embedding copy
            embedding_weight = self.shared_embedding_or_output_weight()
        return LatentTargets(
            consistency_weight=self.mtp_config.latent_consistency_weight,
            anchoring_weight=self.mtp_config.semantic_anchoring_weight,
            trunk_hidden=trunk_hidden_states,
            embedding_weight=embedding_weight,
            tp_group=self.output_layer.tp_group,
            sequence_parallel=self.config.sequence_parallel,
        )

    def _check_mtp_inputs(self, input_ids, labels, loss_mask, packed_seq_params, mtp_step) -> None:
        if packed_seq_params is not None:
            raise NotImplementedError("MTPGPTModel does not support packed sequences yet")
        if self.mtp_process and input_ids is None:
            raise ValueError("sequential MTP needs input_ids on the last pipeline stage")
        if input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if loss_mask is not None and loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape {tuple(labels.shape)}")
        if labels.shape[-1] <= self.mtp_config.num_layers:
            raise ValueError(
                f"sequence length {labels.shape[-1]} must exceed MTP num_layers ({self.mtp_config.num_layers})"
            )
        if self.training and mtp_step is None and self.mtp_config.loss_scaling_schedule:
            raise ValueError("mtp_config.loss_scaling_schedule is set: pass mtp_step=<training step> to forward")


def _check_configs(config, mtp_config, mtp_block_spec, max_sequence_length, position_embedding_type, gpt_kwargs):
    if not isinstance(mtp_config, MTPConfig):
        raise TypeError(f"mtp_config must be an MTPConfig, got {type(mtp_config).__name__}")
    mtp_config.check_model(max_sequence_length, position_embedding_type)
    if config.mtp_num_layers != mtp_config.megatron_mtp_num_layers:
        raise ValueError(
            f"TransformerConfig.mtp_num_layers is {config.mtp_num_layers} but this MTP config "
            f"(mode={mtp_config.mode}, num_layers={mtp_config.num_layers}) needs "
            f"{mtp_config.megatron_mtp_num_layers}: set it to MTPConfig.megatron_mtp_num_layers"
        )
    if mtp_config.enabled and mtp_block_spec is None:
        raise ValueError("mtp_block_spec is required when MTP is enabled (see megatron_mtp.layers.get_mtp_block_spec)")
    if "mtp_block_spec" in gpt_kwargs:
        raise ValueError("pass mtp_block_spec from megatron_mtp.layers.get_mtp_block_spec, not Megatron-Core's")
    if mtp_config.enabled and config.context_parallel_size > 1:
        raise NotImplementedError("MTPGPTModel does not support context parallelism yet")
