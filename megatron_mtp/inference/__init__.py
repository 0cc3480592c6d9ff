"""Generation on Megatron-Core: KV-cached greedy decoding, and self-speculative decoding with the MTP layers as
drafts (``kv_cache``: the main model's cached forward; ``drafting``: MTP drafts with their own caches;
``generation``: the plain and speculative loops with their counts)."""

from megatron_mtp.inference.drafting import MTPDrafter, check_draft_settings
from megatron_mtp.inference.generation import (
    Generation,
    GenerationStats,
    accepted_prefix,
    greedy_generate,
    speculative_generate,
)
from megatron_mtp.inference.kv_cache import CachedMainModel, attention_mask_at, greedy_ids

__all__ = [
    "CachedMainModel",
    "Generation",
    "GenerationStats",
    "MTPDrafter",
    "accepted_prefix",
    "attention_mask_at",
    "check_draft_settings",
    "greedy_generate",
    "greedy_ids",
    "speculative_generate",
]
