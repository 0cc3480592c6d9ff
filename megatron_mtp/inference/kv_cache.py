"""The main model's KV-cached forward: Megatron-Core's static inference context, written at any offset.

A static context holds, per attention layer, key and value buffers of ``max_sequence_length`` positions and one
``sequence_len_offset``: a forward over s tokens writes positions ``offset .. offset+s-1`` and attends over
``0 .. offset+s-1``. Rolling back is setting the offset back; the stale positions beyond it are never read and
are overwritten by the next forward.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from megatron_mtp.compat import static_inference_context


def attention_mask_at(offset: int, length: int) -> Tensor:
    """Causal mask of ``length`` new tokens at positions ``offset..``, over the cached keys and theirs.

    Returns bool [1, 1, length, offset + length], True where attention is masked (key after the query).
    Megatron-Core drops its own causal mask type once the offset is past 0, so the mask must be explicit.
    """
    queries = torch.arange(offset, offset + length).unsqueeze(1)
    keys = torch.arange(offset + length).unsqueeze(0)
    return (keys > queries).view(1, 1, length, offset + length)


def greedy_ids(logits: Tensor, vocab_size: int) -> Tensor:
    """Argmax over the real vocabulary (padding ids excluded): logits [..., V_padded] -> ids [...]."""
    return logits[..., :vocab_size].argmax(dim=-1)


class CachedMainModel:
    """The main model (``MTPGPTModel``, eval mode) run token block by token block over its own KV cache.

    Each ``forward`` also records the decoder's final-normed output h_0, which MTP layers read.
    """

    def __init__(self, model, max_sequence_length: int):
        self.model = model
        self.max_sequence_length = max_sequence_length
        self.context = static_inference_context(max_sequence_length)
        self._hidden: Optional[Tensor] = None

    def _record_hidden(self, module, inputs, output):
        self._hidden = output[0] if isinstance(output, tuple) else output

    @property
    def offset(self) -> int:
        """Positions held in the cache (the position of the next token fed)."""
        return self.context.sequence_len_offset

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """Feed ``tokens`` [s] (int64) at positions ``offset .. offset+s-1`` and advance the offset by s.

        Returns (logits [s, V_padded], gathered over tensor-parallel ranks; h_0 [s, 1, h]).
        """
        offset, length = self.offset, tokens.numel()
        if offset + length > self.max_sequence_length:
            raise ValueError(
                f"the KV cache holds {self.max_sequence_length} positions; {length} tokens at offset {offset} exceed it"
            )
        positions = torch.arange(offset, offset + length).unsqueeze(0)
        hook = self.model.decoder.register_forward_hook(self._record_hidden)
        try:
            logits = self.model(
                tokens.view(1, length),
                positions,
                attention_mask_at(offset, length),
                inference_context=self.context,
                runtime_gather_output=True,
            )
        finally:
            hook.remove()
        self.context.sequence_len_offset = offset + length
        return logits[0], self._hidden

    def roll_back(self, length: int) -> None:
        """Keep the first ``length`` cached positions; later ones are overwritten by the next forward."""
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot roll the KV cache back to {length} positions: it holds {self.offset}")
        self.context.sequence_len_offset = length
