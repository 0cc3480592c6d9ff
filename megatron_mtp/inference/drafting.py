"""Draft tokens from the MTP layers, each attending over the whole context through its own KV cache.

Committed tokens x[0..n]: the main model has consumed x[0..n-1] (its cache and h_0 hold positions 0..n-1) and
chose x[n]. Drafts x^[n+1..n+K] come from position n-1:

- sequential (DeepSeek-V3 / vLLM): depth k at position t reads h_{k-1}[t] and the token x[t+k], as in training.
  Depth 1 at n-1 reads h_0[n-1] and x[n] and drafts x^[n+1]; depth k reads depth k-1's output and its draft
  x^[n+k-1] and drafts x^[n+k]. Before that, each depth catches up over the positions its cache lacks, reading
  the previous depth's outputs kept in a buffer. With ``reuse_last_depth`` (vLLM's choice) drafts beyond D run
  depth D again one position further on, its previous output standing in for h_{D-1}.
- parallel heads (Meta): head k at n-1 reads h_0[n-1] only and drafts x^[n+k]; all heads from the same state.

After verification accepts a drafts (x[n+1..n+a] = x^, x[n+a+1] = the main model's own choice), a depth-k cache
position t stays valid when every token it read is committed: t + k <= n + a; positions drafted by a reused depth
never stay. Heads read committed h_0 only, so their caches always stay.
"""

from typing import List, Optional

import torch
from torch import Tensor

from megatron_mtp.compat import static_inference_context
from megatron_mtp.config import MTPConfig
from megatron_mtp.inference.kv_cache import attention_mask_at, greedy_ids


def check_draft_settings(mtp_config: MTPConfig, num_draft_tokens: int, reuse_last_depth: bool) -> None:
    """Clear errors for drafting settings a model cannot serve."""
    if not mtp_config.enabled:
        raise ValueError("speculative decoding drafts with the MTP layers, and this model has none (MTP num_layers 0)")
    if num_draft_tokens < 1:
        raise ValueError(f"the number of draft tokens must be >= 1, got {num_draft_tokens}")
    depths = mtp_config.num_layers
    if num_draft_tokens > depths and mtp_config.mode == "parallel":
        raise ValueError(
            f"{num_draft_tokens} draft tokens but only {depths} parallel heads: a head drafts exactly one position "
            "and has no previous head's output to continue from, so the last one cannot be reused"
        )
    if num_draft_tokens > depths and not reuse_last_depth:
        raise ValueError(
            f"{num_draft_tokens} draft tokens but only {depths} sequential MTP depths: draft at most {depths}, or "
            "reuse the last depth for the extra ones (--reuse-last-mtp-depth)"
        )


class _CachedLayer:
    """One MTP depth or head and its own KV cache (a static inference context)."""

    def __init__(self, layer, max_sequence_length: int):
        self.layer = layer
        self.context = static_inference_context(max_sequence_length)

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def __call__(self, *inputs: Tensor, position: int, rotary_pos_emb: Optional[Tensor]) -> Tensor:
        """Run the layer over s positions starting at ``position`` (= the cache offset); returns [s, 1, h]."""
        if position != self.offset:
            raise RuntimeError(f"MTP cache holds {self.offset} positions; asked to write at {position}")
        length = inputs[0].size(0)
        output = self.layer(
            *inputs,
            attention_mask_at(position, length),
            rotary_pos_emb=rotary_pos_emb,
            inference_context=self.context,
        )
        self.context.sequence_len_offset = position + length
        return output

    def roll_back(self, length: int) -> None:
        self.context.sequence_len_offset = min(self.offset, length)


class MTPDrafter:
    """Drafts for one sequence with ``model``'s MTP block (``MTPGPTModel`` in eval mode, whole model on this
    pipeline stage). ``record_trunk`` must be given every h_0 the main model computes."""

    def __init__(self, model, max_sequence_length: int, vocab_size: int, num_draft_tokens: int, reuse_last_depth: bool):
        check_draft_settings(model.mtp_config, num_draft_tokens, reuse_last_depth)
        self.model = model
        self.mode = model.mtp_config.mode
        self.vocab_size = vocab_size
        self.layers = [_CachedLayer(layer, max_sequence_length) for layer in model.mtp.layers]
        self.rotary_pos_emb = (
            model.rotary_pos_emb(max_sequence_length) if model.position_embedding_type == "rope" else None
        )
        # states[k] holds h_k, k = 0..D-1, by position [max_sequence_length, 1, h]: what depth k+1 reads.
        hidden_size = model.config.hidden_size
        kept = 1 if self.mode == "parallel" else len(self.layers)
        dtype = model.config.params_dtype
        self.states = [torch.zeros(max_sequence_length, 1, hidden_size, dtype=dtype) for _ in range(kept)]
        tied = model.share_embeddings_and_output_weights
        self.output_weight = model.shared_embedding_or_output_weight() if tied else None

    def record_trunk(self, position: int, hidden: Tensor) -> None:
        """h_0 [s, 1, h] of the main model at positions ``position..position+s-1``."""
        self.states[0][position : position + hidden.size(0)] = hidden

    def _draft_id(self, hidden: Tensor) -> int:
        """Greedy token from one MTP output state [1, 1, h] through the shared output layer."""
        logits, _ = self.model.output_layer(hidden, weight=self.output_weight, runtime_gather_output=True)
        return int(greedy_ids(logits[0, 0], self.vocab_size))

    def _embed(self, tokens: Tensor, first_position: int) -> Tensor:
        """Embeddings [s, 1, h] of ``tokens`` [s] whose positions start at ``first_position``."""
        positions = torch.arange(first_position, first_position + tokens.numel()).view(1, -1)
        return self.model.embedding(input_ids=tokens.view(1, -1), position_ids=positions)

    @torch.no_grad()
    def draft(self, tokens: Tensor, last: int, count: int) -> List[int]:
        """Write ``count`` drafts into ``tokens[last+1 .. last+count]`` and return them.

        tokens: int64 buffer, committed up to index ``last`` (= n); h_0 recorded for positions 0..n-1.
        """
        if self.mode == "parallel":
            return self._draft_parallel(tokens, last, count)
        return self._draft_sequential(tokens, last, count)

    def _draft_parallel(self, tokens: Tensor, last: int, count: int) -> List[int]:
        drafts = []
        for k, head in enumerate(self.layers[:count], start=1):
            start = head.offset
            output = head(self.states[0][start:last], position=start, rotary_pos_emb=self.rotary_pos_emb)
            drafts.append(self._draft_id(output[-1:]))
            tokens[last + k] = drafts[-1]
        return drafts

    def _draft_sequential(self, tokens: Tensor, last: int, count: int) -> List[int]:
        drafts, depths = [], len(self.layers)
        for k, depth in enumerate(self.layers[: min(count, depths)], start=1):
            start = depth.offset
            embeddings = self._embed(tokens[start + k : last + k], start + k)
            output = depth(
                self.states[k - 1][start:last], embeddings, position=start, rotary_pos_emb=self.rotary_pos_emb
            )
            if k < depths:
                self.states[k][start:last] = output
            drafts.append(self._draft_id(output[-1:]))
            tokens[last + k] = drafts[-1]
        for extra in range(depths + 1, count + 1):  # the last depth reused, one position further each time
            position = last - 1 + extra - depths
            embeddings = self._embed(tokens[last + extra - 1 : last + extra], last + extra - 1)
            output = self.layers[-1](output[-1:], embeddings, position=position, rotary_pos_emb=self.rotary_pos_emb)
            drafts.append(self._draft_id(output))
            tokens[last + extra] = drafts[-1]
        return drafts

    def accept(self, last: int, accepted: int) -> None:
        """Roll each cache back to its valid positions after ``accepted`` drafts from ``last`` were accepted."""
        if self.mode == "parallel":
            return
        for k, depth in enumerate(self.layers, start=1):
            depth.roll_back(min(last, last + accepted - k + 1))
