"""Greedy decoding with the main model's KV cache, plain or speculative with MTP drafts (batch 1).

Speculative decoding (one round): draft K tokens from position n-1 (``drafting.MTPDrafter``), feed
[x[n], x^[n+1..n+K]] to the main model in one forward at cache offset n, accept the longest draft prefix that
equals the main model's own greedy choices, add its next choice (the bonus token), and roll every cache back past
the rejected drafts. The tokens are those of plain greedy decoding: each is the main model's argmax given the
committed tokens before it, computed over a block instead of one token at a time (equal up to floating-point
summation order, which can only matter where two logits tie to within rounding).
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from megatron_mtp.inference.drafting import MTPDrafter
from megatron_mtp.inference.kv_cache import CachedMainModel, greedy_ids


@dataclass
class GenerationStats:
    """Counts of one or more generations; ``draft_proposed[i]`` / ``draft_accepted[i]``: rounds that drafted
    / accepted a token at draft position i+1 (accepting it means accepting every draft before it too)."""

    new_tokens: int = 0
    decode_forwards: int = 0  # main-model forwards after the prefill (one per token, or one per speculative round)
    seconds: float = 0.0
    draft_proposed: List[int] = field(default_factory=list)
    draft_accepted: List[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per decode forward of the main model (the prefill's token excluded): 1.0 for plain."""
        return (self.new_tokens - 1) / max(self.decode_forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def acceptance(self) -> List[float]:
        return [a / p if p else 0.0 for a, p in zip(self.draft_accepted, self.draft_proposed)]

    def add(self, other: "GenerationStats") -> None:
        self.new_tokens += other.new_tokens
        self.decode_forwards += other.decode_forwards
        self.seconds += other.seconds
        width = max(len(self.draft_proposed), len(other.draft_proposed))
        for name in ("draft_proposed", "draft_accepted"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, [sum(c[i] for c in (mine, theirs) if i < len(c)) for i in range(width)])


@dataclass
class Generation:
    tokens: List[int]  # the new tokens, after the prompt
    stats: GenerationStats


def check_lengths(prompt: List[int], max_new_tokens: int, max_sequence_length: int) -> None:
    """The prompt and the tokens asked for must fit the model's sequence length (its KV cache)."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > max_sequence_length:
        raise ValueError(
            f"the prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens exceed the model's sequence length "
            f"({max_sequence_length}): shorten the prompt or ask for fewer new tokens"
        )


def _finish(tokens: List[int], max_new_tokens: int, eod: Optional[int]) -> List[int]:
    """Cut at ``max_new_tokens`` and after the first end-of-document token."""
    tokens = tokens[:max_new_tokens]
    if eod is not None and eod in tokens:
        tokens = tokens[: tokens.index(eod) + 1]
    return tokens


@torch.no_grad()
def greedy_generate(
    model, prompt: List[int], max_new_tokens: int, max_sequence_length: int, vocab_size: int, eod: Optional[int] = None
) -> Generation:
    """Plain KV-cached greedy decoding: the prompt in one forward, then one token per forward."""
    check_lengths(prompt, max_new_tokens, max_sequence_length)
    start = time.perf_counter()
    main = CachedMainModel(model, max_sequence_length)
    logits, _ = main.forward(torch.tensor(prompt))
    new = [int(greedy_ids(logits[-1], vocab_size))]
    stats = GenerationStats()
    while len(new) < max_new_tokens and new[-1] != eod:
        logits, _ = main.forward(torch.tensor(new[-1:]))
        new.append(int(greedy_ids(logits[-1], vocab_size)))
        stats.decode_forwards += 1
    stats.new_tokens, stats.seconds = len(new), time.perf_counter() - start
    return Generation(_finish(new, max_new_tokens, eod), stats)


def accepted_prefix(drafts: List[int], greedy: List[int]) -> int:
    """How many leading drafts equal the main model's greedy choices at the same positions."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == greedy[accepted]:
        accepted += 1
    return accepted


@torch.no_grad()
def speculative_generate(
    model,
    prompt: List[int],
    max_new_tokens: int,
    max_sequence_length: int,
    vocab_size: int,
    num_draft_tokens: int,
    reuse_last_depth: bool = False,
    eod: Optional[int] = None,
    drafter=None,
) -> Generation:
    """Greedy decoding with MTP drafts verified by the main model; returns the tokens of :func:`greedy_generate`.

    ``drafter``: another source of drafts with :class:`MTPDrafter`'s ``record_trunk``, ``draft`` and ``accept``
    (a benchmark's comparison); by default an ``MTPDrafter`` of ``model``.
    """
    check_lengths(prompt, max_new_tokens, max_sequence_length)
    start = time.perf_counter()
    if drafter is None:
        drafter = MTPDrafter(model, max_sequence_length, vocab_size, num_draft_tokens, reuse_last_depth)
    main = CachedMainModel(model, max_sequence_length)
    tokens = torch.zeros(max_sequence_length + num_draft_tokens + 1, dtype=torch.long)  # committed, then drafts
    tokens[: len(prompt)] = torch.tensor(prompt)
    logits, hidden = main.forward(tokens[: len(prompt)])
    drafter.record_trunk(0, hidden)
    last = len(prompt)  # index of the newest committed token, not yet fed to the main model
    tokens[last] = greedy_ids(logits[-1], vocab_size)
    stats = GenerationStats(draft_proposed=[0] * num_draft_tokens, draft_accepted=[0] * num_draft_tokens)
    end = len(prompt) + max_new_tokens  # committed tokens stop at index end - 1
    while last < end - 1 and int(tokens[last]) != eod:
        previous = last
        count = min(num_draft_tokens, end - 1 - last - 1)  # no draft past the last token asked for
        drafts = drafter.draft(tokens, last, count)
        logits, hidden = main.forward(tokens[last : last + count + 1])
        drafter.record_trunk(last, hidden)
        greedy = greedy_ids(logits, vocab_size).tolist()  # greedy[i]: the main model's choice for x[last+i+1]
        accepted = accepted_prefix(drafts, greedy)
        tokens[last + accepted + 1] = greedy[accepted]
        main.roll_back(last + accepted + 1)
        drafter.accept(last, accepted)
        stats.decode_forwards += 1
        for position in range(count):
            stats.draft_proposed[position] += 1
            stats.draft_accepted[position] += position < accepted
        last += accepted + 1
        if eod is not None and bool((tokens[previous + 1 : last + 1] == eod).any()):
            break
    new = tokens[len(prompt) : last + 1].tolist()
    stats.new_tokens, stats.seconds = len(new), time.perf_counter() - start
    return Generation(_finish(new, max_new_tokens, eod), stats)
