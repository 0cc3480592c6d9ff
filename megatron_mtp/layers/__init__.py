from megatron_mtp.layers.block import MTPBlock, MTPBlockSubmodules
from megatron_mtp.layers.parallel_heads import ParallelMTPHead, ParallelMTPHeadSubmodules
from megatron_mtp.layers.roll import PackedSequences, roll_left
from megatron_mtp.layers.sequence_layout import SequenceLayout
from megatron_mtp.layers.sequential import SequentialMTPLayer, SequentialMTPLayerSubmodules
from megatron_mtp.layers.specs import get_mtp_block_spec

__all__ = [
    "MTPBlock", "MTPBlockSubmodules", "PackedSequences", "ParallelMTPHead", "ParallelMTPHeadSubmodules",
    "SequenceLayout", "SequentialMTPLayer",
    "SequentialMTPLayerSubmodules", "get_mtp_block_spec", "roll_left",
]
