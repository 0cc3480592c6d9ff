"""Everything that differs between the Megatron-Core releases this project supports (0.16 to 0.19).

No other module looks at Megatron-Core's version. What differs:

- the attribute holding an MTP layer's transformer layer: ``transformer_layer`` up to 0.16, ``mtp_model_layer``
  from 0.17 (Megatron-Core's CUDA-graph helpers look for it on every ``model.mtp.layers`` entry). Checkpoints
  (torch_dist) call it ``transformer_layer`` in every release, as Megatron-Core's own MTP does;
- how an MTP layer's transformer layer is numbered, so that MoE auxiliary losses land in the tracker slot after
  the decoder's layers (``num_layers + depth``), as for Megatron-Core's own MTP layers: up to 0.16 the layer adds
  its pipeline offset itself, so the number passed in has it taken off; from 0.19 ``is_mtp_layer=True`` tells
  the layer and its router instead;
- with ``calculate_per_token_loss``, Megatron-Core 0.17+ scales each depth's summed loss by
  ``main tokens / depth tokens`` (its rolled mask has fewer tokens); 0.16 adds the plain sum. We follow the
  installed release, so the numbers equal its own MTP's;
- torch_dist's non-tensor ("common") state: 0.16 reads it only from ``common.pt``; 0.17+ keeps it inside the
  DCP files and no longer writes that file. ``save_torch_dist`` writes both, so every checkpoint loads in
  every supported release;
- MLA without a query low-rank projection (``q_lora_rank: null``, DeepSeek-V2-Lite): 0.19 puts a query norm
  before ``linear_q_proj`` whenever ``qk_layernorm`` is set (it fuses one into that projection, or refuses a
  separate one as unused), and the checkpoint has no such norm; 0.16 builds the model as published;
- the layout of Megatron-Core's MTP logging tracker, read by the tests that compare with its MTP;
- Megatron-Core's MoE aux-loss log: module-level functions in ``moe_utils`` up to 0.16 (``track_moe_metrics``,
  ``get_moe_layer_wise_logging_tracker``), a ``MoEMetricsTracker`` object in ``moe_logging`` from 0.19 (the old
  functions remain as deprecated wrappers there); and on 0.19 a router in an MTP layer (``is_mtp_layer``) adds
  ``num_layers`` to its layer number before looking whether it has one, so keeping a router out of the log
  takes both;
- where a static inference context keeps ``materialize_only_last_token_logits``: on the context in 0.16, in its
  ``InferenceConfig`` (``context.config``) in 0.19;
- ``HybridModel`` (``megatron.core.models.hybrid``, layers chosen by ``hybrid_layer_pattern``): in 0.19, not in
  0.16; ``megatron_mtp.hybrid`` builds on it and asks :func:`require_hybrid_model` first;
- the word embedding's weight: 0.19 can shard it beyond tensor parallelism and gather it in each forward
  (``gtp_remat`` groups); the fused lookup of ``layers/embedding_grad.py`` then leaves the lookup to Megatron-Core;
- ``megatron.core.utils.get_batch_on_this_cp_rank`` (a batch cut to a context-parallel rank's chunks): the batch
  and an optional group up to 0.16; 0.19 adds a required ``is_hybrid_cp`` (and needs the group);
- the extra keyword arguments ``GPTModel`` passes to ``_postprocess`` (``padding_mask`` and output processors in
  0.18+): the model takes them by keyword and hands them on unchanged, so nothing here needs to know.
"""

import importlib.util
import inspect
import os
from typing import Any, Dict, List, Optional, Union

import torch
from megatron.core import __version__ as _megatron_core_version
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping, extract_nonpersistent, extract_sharded_base
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper, get_mtp_layer_offset
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_batch_on_this_cp_rank
from packaging.version import Version

MEGATRON_CORE_VERSION = Version(_megatron_core_version)
SUPPORTED_RANGE = (Version("0.16.0"), Version("0.20.0"))
if not SUPPORTED_RANGE[0] <= MEGATRON_CORE_VERSION < SUPPORTED_RANGE[1]:
    raise ImportError(
        f"megatron_mtp supports megatron-core >=0.16,<0.20 (tested: 0.16.1, 0.19.2); found {_megatron_core_version}"
    )

_MTP_LAYER_FLAG = MEGATRON_CORE_VERSION >= Version("0.19.0")
_MOE_METRICS_TRACKER = MEGATRON_CORE_VERSION >= Version("0.19.0")
if _MOE_METRICS_TRACKER:
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker
else:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics

_COMMON_STATE_IN_DCP = MEGATRON_CORE_VERSION >= Version("0.17.0")

MLA_WITHOUT_QUERY_LOW_RANK = MEGATRON_CORE_VERSION < Version("0.19.0")
"""MLA with ``q_lora_rank=None`` and the q/kv norms can be built as DeepSeek publishes it (see above)."""

PER_TOKEN_LOSS_RESCALES_DEPTHS = MEGATRON_CORE_VERSION >= Version("0.17.0")
"""Per-token loss mode: each depth's loss sum is scaled by ``main tokens / depth tokens`` (see above)."""

MTP_INNER_LAYER = "mtp_model_layer" if MEGATRON_CORE_VERSION >= Version("0.17.0") else "transformer_layer"
"""Attribute name of an MTP layer's transformer layer in this release (plain ``state_dict`` keys use it)."""

CHECKPOINT_INNER_LAYER = "transformer_layer"
"""Name of an MTP layer's transformer layer in torch_dist checkpoints, in every release."""

HAS_HYBRID_MODEL = importlib.util.find_spec("megatron.core.models.hybrid") is not None
"""Megatron-Core has ``HybridModel`` (0.19; not 0.16): ``megatron_mtp.hybrid`` and ``--hybrid-layer-pattern``."""


def require_hybrid_model(what: str) -> None:
    """Raise a clear error naming ``what`` when this Megatron-Core has no ``HybridModel``."""
    if not HAS_HYBRID_MODEL:
        raise RuntimeError(
            f"{what} needs Megatron-Core's HybridModel (megatron.core.models.hybrid, megatron-core 0.19+); "
            f"the installed megatron-core is {_megatron_core_version}"
        )


def _mtp_transformer_layer_args(config: TransformerConfig, depth: int, vp_stage: Optional[int]) -> dict:
    """Keyword arguments numbering the transformer layer of MTP depth (or parallel head) ``depth`` (1-based).

    The layer ends up numbered ``config.num_layers + depth`` (plus Megatron-Core's MTP offset under a custom
    pipeline layout) for MoE aux-loss tracking, whatever the pipeline stage, as Megatron-Core's MTP layers are.
    """
    layer_number = depth + get_mtp_layer_offset(config, vp_stage)
    if _MTP_LAYER_FLAG:
        return dict(layer_number=layer_number, is_mtp_layer=True)
    return dict(layer_number=layer_number + config.num_layers - get_transformer_layer_offset(config, vp_stage))


class MTPLayerModule(MegatronModule):
    """Base of an MTP depth or head: holds its transformer layer under this release's attribute name.

    Plain ``state_dict`` keys are therefore those of Megatron-Core's own MTP in the same release; torch_dist keys
    use ``transformer_layer`` in every release, so checkpoints move between releases.
    """

    def _build_inner_layer(self, spec, config: TransformerConfig, depth: int, pg_collection, vp_stage) -> None:
        """Build the transformer layer of depth (or head) ``depth`` from ``spec``, numbered as Megatron-Core's."""
        layer = build_module(
            spec, config=config, pg_collection=pg_collection, vp_stage=vp_stage,
            **_mtp_transformer_layer_args(config, depth, vp_stage),
        )
        self.add_module(MTP_INNER_LAYER, layer)

    @property
    def inner_layer(self) -> MegatronModule:
        return getattr(self, MTP_INNER_LAYER)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # An inner layer may name itself otherwise (a hybrid stack: Megatron-Core's hybrid MTP keeps its attribute).
        checkpoint_name = getattr(self.inner_layer, "mtp_checkpoint_name", CHECKPOINT_INNER_LAYER)
        if MTP_INNER_LAYER != checkpoint_name:
            apply_prefix_mapping(state, {f"{prefix}{MTP_INNER_LAYER}.": f"{prefix}{checkpoint_name}."})
        return state


def static_inference_context(max_sequence_length: int):
    """Megatron-Core's ``StaticInferenceContext`` for one sequence of up to ``max_sequence_length`` tokens, set to
    return the logits of every token of a forward (a speculative verification needs them all), not only the last."""
    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_sequence_length)
    settings = getattr(context, "config", context)  # the release that moved it is not pinned down (0.17 to 0.19)
    settings.materialize_only_last_token_logits = False
    return context


def megatron_core_mtp_logged_losses() -> torch.Tensor:
    """The per-depth losses Megatron-Core's own MTP logged since its tracker was last cleared, [D]."""
    tracker = MTPLossLoggingHelper.tracker
    return (tracker["loss_values"] if "loss_values" in tracker else tracker["values"]).clone()


def save_torch_dist(sharded_state_dict: dict, directory: str) -> None:
    """``dist_checkpointing.save`` (collective), readable by every supported release (see above)."""
    common_state = None
    if _COMMON_STATE_IN_DCP:
        _, persistent = extract_nonpersistent(sharded_state_dict)
        _, common_state = extract_sharded_base(persistent)
    dist_checkpointing.save(sharded_state_dict, directory)
    if common_state is not None and torch.distributed.get_rank() == 0:
        torch.save(common_state, os.path.join(directory, COMMON_STATE_FNAME))


def untrack_moe_router(router: MegatronModule) -> None:
    """Keep ``router``'s aux losses out of Megatron-Core's per-layer MoE log; they still reach the loss."""
    router.set_layer_number(None)
    if _MTP_LAYER_FLAG:
        router.is_mtp_layer = False


def moe_aux_loss_values() -> Dict[str, torch.Tensor]:
    """Megatron-Core's per-layer MoE aux-loss log as it stands: name -> [num_layers + mtp_num_layers] (slot
    ``layer_number - 1``, MTP layers after the decoder's), summed over the micro-batches since it was cleared.
    The tensors are the log's own."""
    if _MOE_METRICS_TRACKER:
        return {name: entry.values for name, entry in get_moe_metrics_tracker().metrics.items()}
    return {name: entry["values"] for name, entry in get_moe_layer_wise_logging_tracker().items()}


def reset_moe_aux_loss_log() -> None:
    """Forget Megatron-Core's MoE aux-loss log, entries included: their size is fixed by the first model that
    logged, and a model with another layer count needs them gone."""
    if _MOE_METRICS_TRACKER:
        destroy_moe_metrics_tracker()
    else:
        get_moe_layer_wise_logging_tracker().clear()


def report_moe_aux_losses(
    loss_scale: float,
    iteration: int,
    track_names: List[str],
    num_layers: int,
    moe_layer_freq: Union[int, List[int]],
    mtp_num_layers: Optional[int],
    writer=None,
    per_layer_logging: bool = False,
    total_loss_dict: Optional[dict] = None,
) -> None:
    """Megatron-LM's end-of-step MoE log through Megatron-Core's own reporter. Every rank calls it: the values are
    summed over pipeline stages and averaged over data-parallel ranks, scaled by ``loss_scale``, written to
    ``writer`` (TensorBoard) as ``{name}`` (mean over MoE layers) and, with ``per_layer_logging``, as
    ``moe/{name}_layer_{i}``; that mean is added to ``total_loss_dict``; then the log is cleared."""
    arguments = dict(
        loss_scale=loss_scale,
        iteration=iteration,
        writer=writer,
        per_layer_logging=per_layer_logging,
        force_initialize=True,
        track_names=track_names,
        num_layers=num_layers,
        moe_layer_freq=moe_layer_freq,
        mtp_num_layers=mtp_num_layers,
        total_loss_dict=total_loss_dict,
    )
    if _MOE_METRICS_TRACKER:
        get_moe_metrics_tracker().report(**arguments)
    else:
        track_moe_metrics(**arguments)


def embedding_weight_gathered_per_forward(embedding: torch.nn.Module) -> bool:
    """Whether a ``VocabParallelEmbedding`` gathers its weight in each forward (0.19's ``gtp_remat_size`` > 1)."""
    return getattr(embedding, "gtp_remat_size", 1) > 1


_CP_BATCH_HYBRID_FLAG = "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters


def batch_on_this_cp_rank(batch: Dict[str, Any], cp_group) -> Dict[str, Any]:
    """Megatron-Core's cut of ``batch`` ([b, s] tensors, an attention mask [b, 1, s, s]) to this context-parallel
    rank's two chunks of the sequence (load-balanced; see ``layers/context_parallel.py``)."""
    if _CP_BATCH_HYBRID_FLAG:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)
