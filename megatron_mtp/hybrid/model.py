"""Multi-token prediction on Megatron-Core's ``HybridModel`` (attention, MLP, MoE and Mamba layers chosen by a
``hybrid_layer_pattern``).

The pattern's MTP parts (``"*-*E/*-/*-"``: two depths of ``*-``) give the layers of each of our MTP depths or
parallel heads (``hybrid.specs.get_hybrid_mtp_block_spec``); ``HybridModel`` itself gets only the decoder part,
so its own MTP is never built. ``HybridModel.forward`` has no post-processing hook as ``GPTModel._postprocess``
is; the seam is its decoder: on the last stage ``forward`` runs ``HybridModel.forward`` up to the decoder output
(as it runs on an earlier pipeline stage), reads the decoder's inputs (the embedded tokens, the rotary embedding)
as it is called, and then runs the MTP and next-token losses shared with ``MTPGPTModel`` (``MTPModelMixin``).
"""

import contextlib
import functools
from typing import Literal, Optional

from torch import Tensor

from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.models.hybrid.hybrid_layer_allocation import get_hybrid_total_layer_count, parse_hybrid_pattern
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.config import MTPConfig
from megatron_mtp.hybrid.specs import check_mtp_parts, check_pattern_runs_here
from megatron_mtp.loss.metrics import MTPStats
from megatron_mtp.model import MTPModelMixin, _check_configs


class MTPHybridModel(MTPModelMixin, HybridModel):
    """``HybridModel`` plus our MTP block.

    Args beyond ``HybridModel``'s:
        hybrid_layer_pattern: the decoder's pattern and, after '/', one part per MTP depth (or head).
        mtp_config: the MTP settings; ``config.mtp_num_layers`` must equal ``mtp_config.megatron_mtp_num_layers``
            and ``config.num_layers`` the pattern's decoder layers.
        mtp_block_spec: from ``hybrid.specs.get_hybrid_mtp_block_spec``; required when ``mtp_config.enabled``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hybrid_stack_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        hybrid_layer_pattern: str,
        mtp_config: MTPConfig,
        mtp_block_spec: Optional[ModuleSpec] = None,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: Literal["learned_absolute", "rope", "yarn", "none"] = "none",
        scatter_embedding_sequence_parallel: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        **hybrid_kwargs,
    ):
        _check_configs(config, mtp_config, mtp_block_spec, max_sequence_length, position_embedding_type, {})
        check_pattern_runs_here(hybrid_layer_pattern)
        check_mtp_parts(hybrid_layer_pattern, mtp_config)
        if config.num_layers != get_hybrid_total_layer_count(hybrid_layer_pattern):
            raise ValueError(
                f"TransformerConfig.num_layers is {config.num_layers} but hybrid layer pattern "
                f"{hybrid_layer_pattern!r} has {get_hybrid_total_layer_count(hybrid_layer_pattern)} decoder layers"
            )
        self._embedding_setup_deferred = True
        super().__init__(
            config=config,
            hybrid_stack_spec=hybrid_stack_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            hybrid_layer_pattern=parse_hybrid_pattern(hybrid_layer_pattern).main_pattern,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            **hybrid_kwargs,
        )
        self._init_mtp(
            config,
            mtp_config,
            mtp_block_spec,
            vocab_size,
            max_sequence_length,
            position_embedding_type,
            scatter_embedding_sequence_parallel,
            share_embeddings_and_output_weights,
            vp_stage,
        )

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor],
        decoder_input: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        inference_context=None,
        runtime_gather_output: Optional[bool] = None,
        *,
        loss_mask: Optional[Tensor] = None,
        packed_seq_params=None,
        padding_mask: Optional[Tensor] = None,
        mtp_stats: Optional[MTPStats] = None,
        mtp_step: Optional[int] = None,
        compute_mtp: Optional[bool] = None,
    ) -> Tensor:
        """``HybridModel.forward`` with MTP; the MTP arguments are ``MTPGPTModel.forward``'s.

        Returns:
            last stage, labels given: per-token next-token loss [b, s]; without labels: logits [b, s, V]
            (V/tp unless gathered); earlier stages: the decoder output [s, b, h].
        """
        if inference_context is not None:
            raise NotImplementedError("MTPHybridModel does not run under an inference context (generation) yet")
        hybrid_args = dict(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            runtime_gather_output=runtime_gather_output,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        if not self.post_process:
            return super().forward(labels=labels, **hybrid_args)
        self._mtp_call = self._new_mtp_call(
            mtp_stats, mtp_step, compute_mtp, decoder_input, packed_seq_params, labels if labels is not None else input_ids
        )
        try:
            with self._decoder_inputs_read() as decoder_inputs, self._decoder_output_only():
                hidden_states = super().forward(**hybrid_args)
            plain_output = functools.partial(self._plain_output, hidden_states, labels, runtime_gather_output)
            kwargs = {**hybrid_args, **decoder_inputs, "labels": labels}
            return self._postprocess_with_mtp(hidden_states, plain_output, **kwargs)
        finally:
            self._mtp_call = None

    def _plain_output(self, hidden_states: Tensor, labels: Optional[Tensor], runtime_gather_output) -> Tensor:
        """What ``HybridModel.forward`` does after its decoder (training and evaluation; no inference context):
        the output layer, then the next-token loss [b, s], or the logits [b, s, V] without labels."""
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    @contextlib.contextmanager
    def _decoder_output_only(self):
        """Make ``HybridModel.forward`` return its decoder's output [s, b, h], as on an earlier pipeline stage, and
        keep its own MTP path (``mtp_process``, which stays set for Megatron-Core's embedding bookkeeping) shut."""
        saved = self.post_process, self.mtp_process
        self.post_process, self.mtp_process = False, False
        try:
            yield
        finally:
            self.post_process, self.mtp_process = saved

    @contextlib.contextmanager
    def _decoder_inputs_read(self):
        """Yield a dict that receives what ``HybridModel.forward`` passes its decoder: ``decoder_input`` (the
        embedded tokens on the first stage, [s, b, h]; None on later ones) and ``rotary_pos_emb``."""
        inputs = {}

        def read(module, args, kwargs):
            inputs.update(decoder_input=kwargs.get("hidden_states"), rotary_pos_emb=kwargs.get("rotary_pos_emb"))

        handle = self.decoder.register_forward_pre_hook(read, with_kwargs=True)
        try:
            yield inputs
        finally:
            handle.remove()
