"""Megatron-LM integration: the pieces ``pretrain_gpt.py`` hands to Megatron-LM's ``pretrain()``.

A Megatron-LM checkout applies ``patches/<release>/pretrain_gpt.patch`` (top of this repository), which swaps in:

- :func:`mtp_extra_args_provider`: our ``--mtp-*`` flags beside Megatron-LM's ``--mtp-num-layers`` and
  ``--mtp-loss-scaling-factor``;
- :func:`with_mtp`: wraps ``gpt_builder``; with ``--mtp-num-layers`` it builds :class:`MTPGPTModel` instead
  (``MTPHybridModel`` with Megatron-LM 0.19's ``--hybrid-layer-pattern``);
- :func:`mtp_forward_step`: wraps ``forward_step``; passes the MTP step and gathers per-depth metrics into the
  report dict Megatron-LM reduces and logs (stdout and TensorBoard);
- :func:`mtp_get_embedding_ranks`: the pipeline ranks holding the word embedding (parallel heads need none).

``args.mtp_num_layers`` keeps DeepSeek's meaning for Megatron-LM (the number of MTP modules, all on the last
pipeline stage), which is right for parallel heads too in ``get_batch``, the FLOPs count and the pipeline-layout
check; only the model's ``TransformerConfig`` and the embedding ranks treat the two modes differently.
"""

from megatron_mtp.megatron_lm.arguments import mtp_config_from_megatron_args, mtp_extra_args_provider
from megatron_mtp.megatron_lm.embedding_ranks import mtp_get_embedding_ranks
from megatron_mtp.megatron_lm.forward_step import mtp_forward_step
from megatron_mtp.megatron_lm.model_provider import mtp_model_config, with_mtp

__all__ = [
    "mtp_config_from_megatron_args",
    "mtp_extra_args_provider",
    "mtp_forward_step",
    "mtp_get_embedding_ranks",
    "mtp_model_config",
    "with_mtp",
]
