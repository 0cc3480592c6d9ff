"""MTP on Megatron-Core's ``HybridModel`` (megatron-core 0.19+; importing this on an older release raises)."""

from megatron_mtp.compat import require_hybrid_model

require_hybrid_model("megatron_mtp.hybrid")

from megatron_mtp.hybrid.model import MTPHybridModel  # noqa: E402
from megatron_mtp.hybrid.specs import (  # noqa: E402
    HybridMTPStack,
    check_pattern_runs_here,
    get_hybrid_mtp_block_spec,
    get_hybrid_stack_spec,
)

__all__ = [
    "HybridMTPStack", "MTPHybridModel", "check_pattern_runs_here", "get_hybrid_mtp_block_spec", "get_hybrid_stack_spec",
]
