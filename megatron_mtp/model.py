"""GPT with multi-token prediction on Megatron-Core's ``GPTModel``.

The decoder, embedding, rotary embedding and output layer are Megatron-Core's. MTP modules live on the last
pipeline stage (``post_process``: with virtual pipeline stages, the last model chunk of the last rank; a
pipeline layout must put its ``m`` layers there, beside ``L``). Sequential MTP embeds rolled tokens with that
stage's copy of the vocab-parallel word embedding, which Megatron-Core keeps equal to stage 0's through the
embedding group (``TransformerConfig.mtp_num_layers`` tells it to); parallel heads need no embedding. All
depths share the output layer (tied to the embedding or not).

Training (labels given): ``forward`` returns the per-token next-token loss [b, s], exactly as ``GPTModel``
does, with the MTP term riding along into backward (see ``loss/mtp_loss.py``); by default that loss comes from
the chunked output layer + cross-entropy of ``loss/chunked.py`` (also without MTP: ``MTPConfig.num_layers=0``).
Under gradient-accumulation fusion the word-embedding lookup adds its weight gradient straight into Megatron DDP's
``main_grad`` (``layers/embedding_grad.py``).
Per-depth losses and acceptance counts go to the ``MTPStats`` passed as ``mtp_stats``. Without labels it returns the main
logits [b, s, V] only; MTP runs in training, and in eval when ``compute_mtp=True``.
"""

import contextlib
import functools
from typing import Callable, Literal, NamedTuple, Optional

import torch
from torch import Tensor

from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers.embedding_grad import fuse_embedding_weight_grad
from megatron_mtp.layers.roll import PackedSequences
from megatron_mtp.layers.sequence_layout import SequenceLayout
from megatron_mtp.loss.chunked import chunked, chunked_token_loss
from megatron_mtp.loss.latent import LatentTargets
from megatron_mtp.loss.metrics import MTPStats, count_main_agreement, vocab_parallel_argmax
from megatron_mtp.loss.mtp_loss import MTPLossResult, OutputHead, inject_mtp_loss, mtp_loss, plain_depth_loss


class _MTPCall(NamedTuple):
    """The MTP options of one ``forward`` call, read in ``_postprocess``."""

    stats: Optional[MTPStats] = None
    step: Optional[int] = None
    compute_mtp: Optional[bool] = None
    decoder_input_given: bool = False  # the caller's own decoder input, not the embedding of input_ids
    layout: SequenceLayout = SequenceLayout()  # packed documents and CP group of this micro-batch


class MTPModelMixin:
    """The MTP part of a Megatron-Core language model (``GPTModel``, ``HybridModel``): built by ``_init_mtp``
    after the host's ``__init__``, run by ``_postprocess_with_mtp`` on the last stage's decoder output.

    The host is a ``LanguageModule`` with ``embedding`` (first stage), ``output_layer`` and
    ``compute_language_model_loss``; it sets ``_mtp_call`` around each forward.
    """

    def _init_mtp(
        self,
        config: TransformerConfig,
        mtp_config: MTPConfig,
        mtp_block_spec: Optional[ModuleSpec],
        vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: str,
        scatter_embedding_sequence_parallel: bool,
        share_embeddings_and_output_weights: bool,
        vp_stage: Optional[int],
    ) -> None:
        """Build the MTP block (and the last stage's word-embedding copy) once the host model is built; the host
        sets ``_embedding_setup_deferred = True`` before its own ``__init__``, which this ends."""
        pre_process, post_process = self.pre_process, self.post_process
        self.mtp_config = mtp_config
        self._mtp_call: Optional[_MTPCall] = None
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
                # The output layer reads the embedding copy above; the host allocated a weight it never uses.
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
        if hasattr(self, "embedding"):
            fuse_embedding_weight_grad(
                self.embedding.word_embeddings,
                config.gradient_accumulation_fusion,
                output_layer_reads_weight=post_process and share_embeddings_and_output_weights,
                ddp_overlaps_grad_reduce=mtp_config.ddp_overlaps_grad_reduce,
            )
        if self.mtp_process and share_embeddings_and_output_weights and not pre_process:
            # The output layer and the MTP embedding lookups share this stage's embedding copy, as the embedding
            # and output layer share one weight at PP=1, where Megatron-Core marks it so. Unmarked, a fused output
            # layer's grad_added_to_main_grad makes Megatron DDP drop the lookups' param.grad.
            self.shared_embedding_or_output_weight().zero_out_wgrad = True

    def setup_embeddings_and_output_layer(self) -> None:
        # GPTModel.__init__ calls this before the MTP stage's embedding copy exists; run it once that is built.
        if not getattr(self, "_embedding_setup_deferred", False):
            super().setup_embeddings_and_output_layer()

    def _postprocess_with_mtp(self, hidden_states: Tensor, plain_output: Callable[[], Tensor], **kwargs) -> Tensor:
        """On the last stage: MTP loss on the decoder output h_0 [s, b, h], then the next-token loss, chunked
        (``_chunks_main_loss``) or ``plain_output()``, the host's own output layer and loss (or logits).

        kwargs: labels, loss_mask, input_ids, position_ids, attention_mask, decoder_input, rotary embeddings,
        packed_seq_params, inference_context (those the host has; ``GPTModel._postprocess``'s names).
        """
        call = self._mtp_call or _MTPCall()
        labels, loss_mask = kwargs.get("labels"), kwargs.get("loss_mask")
        run_mtp = (
            hasattr(self, "mtp")
            and labels is not None
            and (self.training if call.compute_mtp is None else call.compute_mtp)
        )
        if run_mtp:
            if loss_mask is None:
                raise ValueError(
                    f"{type(self).__name__}.forward got labels without loss_mask: MTP needs loss_mask ([b, s], 0 on "
                    "padding and on tokens that must not be predicted) to know which rolled targets are real"
                )
            # Before the main logits exist, so the MTP loss's transient buffers do not add to theirs.
            mtp_result = self._mtp_loss(hidden_states, call, **kwargs)
        want_main_predictions = run_mtp and call.stats is not None
        if self._chunks_main_loss(hidden_states, kwargs):
            output, main_predictions = chunked_token_loss(
                hidden_states,
                self._output_head(),
                labels,
                want_main_predictions,
                self.mtp_config.loss_chunk_size,
                weight_grad_stand_in=self.mtp_config.ddp_overlaps_grad_reduce,
                recompute_logits=self.mtp_config.main_loss_recompute_logits,
            )
        else:
            with _main_predictions_recorded(self.output_layer, enabled=want_main_predictions) as main:
                output = plain_output()
            main_predictions = main.predictions
        if not run_mtp:
            return output
        if call.stats is not None:
            agreement = count_main_agreement(
                mtp_result.stats, mtp_result.predictions, main_predictions, loss_mask, call.layout
            )
            call.stats.add(agreement)
        return inject_mtp_loss(output, mtp_result.term, loss_mask, self.config.calculate_per_token_loss, self._cp_group)

    def _chunks_main_loss(self, hidden_states: Tensor, kwargs: dict) -> bool:
        """Whether the main per-token loss comes from ``chunked_token_loss`` instead of ``GPTModel._postprocess``.

        Only for calls with labels that ``GPTModel._postprocess`` would answer with the output layer followed by
        ``compute_language_model_loss`` and nothing else: not under an inference context, an output processor
        (0.18+), muP's logit scaling or the config logger (which writes the logits to disk); those keep the plain
        path. ``main_loss_implementation=None``: chunked when the micro-batch has more tokens than one chunk.
        """
        implementation = self.mtp_config.main_loss_implementation
        if kwargs.get("labels") is None or implementation == "plain":
            return False
        if (
            kwargs.get("inference_context") is not None
            or kwargs.get("output_processor") is not None
            or getattr(self.config, "use_mup", False)
            or has_config_logger_enabled(self.config)
        ):
            return False
        if implementation == "chunked":
            return True
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        if self.config.sequence_parallel:
            tokens *= self.config.tensor_model_parallel_size
        return tokens > self.mtp_config.loss_chunk_size

    def _output_head(self) -> OutputHead:
        """The output layer as the chunked and MTP losses use it (tied: the shared embedding weight)."""
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        tp_group = self.output_layer.tp_group
        return OutputHead(self.output_layer, output_weight, self.compute_language_model_loss, tp_group)

    def _mtp_loss(self, hidden_states: Tensor, call: _MTPCall, **kwargs) -> MTPLossResult:
        """Run the MTP block on the decoder output h_0 [s, b, h] and return its loss term and counts.

        kwargs: ``GPTModel._postprocess``'s (labels, loss_mask, input_ids, position_ids, rotary embeddings, ...).
        """
        labels, loss_mask = kwargs["labels"], kwargs["loss_mask"]
        input_ids, position_ids = kwargs.get("input_ids"), kwargs.get("position_ids")
        self._check_mtp_inputs(input_ids, labels, loss_mask, call.step)
        depth_hidden_states = self.mtp(
            hidden_states,
            kwargs.get("attention_mask"),
            **self._token_embeddings(call, input_ids, position_ids, kwargs.get("decoder_input")),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            packed_seq_params=kwargs.get("packed_seq_params"),
        )
        config = self.mtp_config
        return mtp_loss(
            depth_hidden_states,
            self._output_head(),
            labels,
            loss_mask,
            depth_weights=config.depth_weights(),
            loss_scale=config.loss_scaling_factor if call.step is None else config.loss_scale_at(call.step),
            per_token_loss=self.config.calculate_per_token_loss,
            depth_loss=self._depth_loss(),
            latent_targets=self._latent_targets(hidden_states, call) if config.latent_losses else None,
            want_stats=call.stats is not None,
            layout=call.layout,
        )

    def _new_mtp_call(self, stats, step, compute_mtp, decoder_input, packed_seq_params, token_ids) -> _MTPCall:
        """The MTP options of one forward call (``MTPGPTModel.forward``'s arguments); ``token_ids``: labels, or the
        input ids where this stage has no labels, checked against a packed micro-batch's documents."""
        layout = SequenceLayout(cp_group=self._cp_group)
        if self.mtp_config.enabled:
            layout = SequenceLayout.of(packed_seq_params, self._cp_group)
            _check_packed_ids(layout.sequences, token_ids, self.config)
        return _MTPCall(stats, step, compute_mtp, decoder_input is not None, layout)

    @property
    def _cp_group(self):
        """The context-parallel group: under CP the sequence is split in Megatron's load-balanced layout, and MTP
        rolls tokens across it (``layers/context_parallel.py``)."""
        return self.pg_collection.cp

    def _token_embeddings(self, call: _MTPCall, input_ids, position_ids, decoder_input) -> dict:
        """Sequential MTP's token embeddings [s, b, h] (see ``MTPBlock.forward``): on the first stage the decoder's
        own input (its gradient joins the main lookup's), on a later stage one lookup in this stage's copy."""
        if not self.mtp_process:
            return {}
        if self.pre_process and not call.decoder_input_given:
            embedded = decoder_input
        else:
            embedded = self.embedding(input_ids=input_ids, position_ids=position_ids)
        with torch.no_grad():
            tail = self.embedding(
                input_ids=torch.zeros_like(input_ids),
                position_ids=None if position_ids is None else torch.zeros_like(position_ids),
            )
        return dict(token_embeddings=embedded, tail_embeddings=tail)

    def _depth_loss(self):
        if self.mtp_config.loss_implementation == "plain":
            return plain_depth_loss
        recompute = self.mtp_config.loss_recompute_logits
        return chunked(self.mtp_config.loss_chunk_size, grad_in_forward=None if recompute is None else not recompute)

    def _latent_targets(self, trunk_hidden_states: Tensor, call: _MTPCall) -> LatentTargets:
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
            layout=call.layout,
        )

    def _check_mtp_inputs(self, input_ids, labels, loss_mask, mtp_step) -> None:
        if self.mtp_process and input_ids is None:
            raise ValueError("sequential MTP needs input_ids on the last pipeline stage")
        if input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if loss_mask is not None and loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape {tuple(labels.shape)}")
        sequence_length = labels.shape[-1] * self.config.context_parallel_size
        if sequence_length <= self.mtp_config.num_layers:
            raise ValueError(
                f"sequence length {sequence_length} must exceed MTP num_layers ({self.mtp_config.num_layers})"
            )
        if self.training and mtp_step is None and self.mtp_config.loss_scaling_schedule:
            raise ValueError("mtp_config.loss_scaling_schedule is set: pass mtp_step=<training step> to forward")



class MTPGPTModel(MTPModelMixin, GPTModel):
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
        packed_seq_params=None,
        extra_block_kwargs: Optional[dict] = None,
        runtime_gather_output: Optional[bool] = None,
        *,
        mtp_stats: Optional[MTPStats] = None,
        mtp_step: Optional[int] = None,
        compute_mtp: Optional[bool] = None,
        **gpt_forward_kwargs,
    ) -> Tensor:
        """``GPTModel.forward``; MTP runs in its ``_postprocess`` step (below).

        Args (beyond ``GPTModel.forward``'s, which include ``loss_mask`` and ``padding_mask``):
            input_ids, position_ids, labels, loss_mask: [b, s]; the last stage needs them all for MTP.
            packed_seq_params: Megatron-Core's THD layout ([1, t] inputs, documents given by cu_seqlens): MTP
                depths roll within each document (``layers/sequence_layout.py``), also under context parallelism
                (cu_seqlens global, each rank's tokens cut by ``layers.context_parallel.thd_local_positions``).
            mtp_stats: receives this micro-batch's per-depth counts (also computes acceptance metrics).
            mtp_step: training step, selects lambda when ``mtp_config.loss_scaling_schedule`` is set.
            compute_mtp: run MTP (default: in training mode, when labels are given).
        Returns:
            labels given: per-token next-token loss [b, s]; else logits [b, s, V] (V/tp unless gathered).
        """
        self._mtp_call = self._new_mtp_call(
            mtp_stats, mtp_step, compute_mtp, decoder_input, packed_seq_params, labels if labels is not None else input_ids
        )
        try:
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input, labels, inference_context,
                packed_seq_params, extra_block_kwargs, runtime_gather_output, **gpt_forward_kwargs,
            )
        finally:
            self._mtp_call = None

    def _postprocess(self, hidden_states: Tensor, **kwargs) -> Tensor:
        """MTP loss on the decoder output h_0 [s, b, h], then the next-token loss: chunked (``_chunks_main_loss``),
        or ``GPTModel``'s own output layer and loss.

        ``kwargs`` are whatever this release's ``GPTModel.forward`` passes; they go on to ``GPTModel._postprocess``
        unchanged (inference contexts, last-token logits, output processors keep working), except that
        Megatron-Core's own MTP is kept out of it.
        """
        kwargs["mtp_in_postprocess"] = False
        if not self.post_process:  # an earlier pipeline stage: GPTModel hands the hidden states on
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        plain_output = functools.partial(self._plain_postprocess, hidden_states, kwargs)
        return self._postprocess_with_mtp(hidden_states, plain_output, **kwargs)

    def _plain_postprocess(self, hidden_states: Tensor, kwargs: dict) -> Tensor:
        """``GPTModel._postprocess``: the output layer and the next-token loss (or the logits)."""
        with _without_megatron_mtp(self.config):
            return super()._postprocess(hidden_states=hidden_states, **kwargs)


def _check_packed_ids(sequences: Optional[PackedSequences], token_ids: Optional[Tensor], config) -> None:
    """A packed micro-batch (Megatron-Core's THD layout) has token_ids [1, t / cp] (labels or input ids where this
    stage has them) covering its documents."""
    if sequences is None or token_ids is None:
        return
    if token_ids.shape[0] != 1:
        raise ValueError(f"packed sequences (THD) need micro-batch size 1, got token ids {tuple(token_ids.shape)}")
    last_end = int((sequences.starts + sequences.lengths).max()) if sequences.lengths.numel() else 0
    positions = token_ids.shape[-1] * config.context_parallel_size
    if last_end > positions:
        raise ValueError(f"cu_seqlens describe {last_end} positions but the micro-batch has {positions}")


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
    if mtp_config.enabled:
        check_mtp_beside_loss(config.pipeline_model_parallel_layout)
    if mtp_config.enabled and getattr(config, "use_mup", False):
        raise NotImplementedError("MTPGPTModel does not scale the MTP logits for muP yet: set use_mup=False")


def check_mtp_beside_loss(layout: Optional[PipelineParallelLayerLayout]) -> None:
    """MTP runs on the model chunk with the loss (``post_process``: the last virtual stage of the last pipeline
    rank), where its loss needs the output layer, labels and loss mask. Megatron-Core's layout may also put its
    MTP layers (``m``) on an earlier stage ("standalone"), which sends the MTP hidden states on to the loss
    stage; our MTP block computes its loss where it runs, so that placement is refused."""
    if layout is None:
        return
    for pp_rank, chunks in enumerate(layout.layout):
        for vp_stage, layers in enumerate(chunks):
            if LayerType.mtp in layers and LayerType.loss not in layers:
                raise NotImplementedError(
                    f"pipeline_model_parallel_layout {layout} (--pipeline-model-parallel-layout): the MTP layers ('m') "
                    f"are on pipeline rank {pp_rank}, virtual stage {vp_stage}, without the loss ('L'). MTPGPTModel computes the MTP loss where MTP "
                    "runs, with the loss stage's output layer and labels: put every 'm' in the last stage, just "
                    "before the 'L' (e.g. '...|mL')"
                )


@contextlib.contextmanager
def _without_megatron_mtp(config: TransformerConfig):
    """Hide ``config.mtp_num_layers`` from ``GPTModel._postprocess``, which runs Megatron-Core's MTP loss whenever
    it is set. The field stays set everywhere else: it keeps the word-embedding copy on the last pipeline stage
    and its gradient all-reduce, which sequential MTP uses."""
    saved = config.mtp_num_layers
    config.mtp_num_layers = None
    try:
        yield
    finally:
        config.mtp_num_layers = saved


class _RecordedPredictions:
    predictions: Optional[Tensor] = None  # [b, s] the main model's greedy ids


@contextlib.contextmanager
def _main_predictions_recorded(output_layer: torch.nn.Module, enabled: bool):
    """Record the greedy ids of the main logits as the output layer makes them (no second pass over them)."""
    recorded = _RecordedPredictions()
    if not enabled:
        yield recorded
        return

    def record(module, inputs, output):
        recorded.predictions = vocab_parallel_argmax(output[0].detach(), module.tp_group).t()

    handle = output_layer.register_forward_hook(record)
    try:
        yield recorded
    finally:
        handle.remove()
