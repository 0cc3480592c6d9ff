from megatron_mtp.loss.metrics import STAT_FIELDS, MTPStats, vocab_parallel_argmax
from megatron_mtp.loss.mtp_loss import OutputHead, inject_mtp_loss, mtp_loss, plain_depth_loss

__all__ = ["STAT_FIELDS", "MTPStats", "OutputHead", "inject_mtp_loss", "mtp_loss", "plain_depth_loss", "vocab_parallel_argmax"]
