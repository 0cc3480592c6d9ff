from megatron_mtp.loss.chunked import chunked_depth_loss
from megatron_mtp.loss.latent import LatentTargets
from megatron_mtp.loss.metrics import STAT_FIELDS, MTPStats, vocab_parallel_argmax
from megatron_mtp.loss.mtp_loss import OutputHead, inject_mtp_loss, mtp_loss, plain_depth_loss

__all__ = [
    "STAT_FIELDS",
    "LatentTargets",
    "MTPStats",
    "OutputHead",
    "chunked_depth_loss",
    "inject_mtp_loss",
    "mtp_loss",
    "plain_depth_loss",
    "vocab_parallel_argmax",
]
