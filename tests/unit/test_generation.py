"""KV-cached greedy decoding and speculative decoding with MTP drafts, one process.

References: greedy decoding without a KV cache (the whole sequence re-run each step), and the MTP block's training
forward over the whole sequence (no cache) for the drafts. The TP=2 run is tests/distributed/test_generation_tp2.py.
"""

import pytest
import torch

import speculative_tiny as st
from megatron_mtp.config import MTPConfig
from megatron_mtp.inference import (
    CachedMainModel,
    MTPDrafter,
    check_draft_settings,
    greedy_generate,
    speculative_generate,
)

NEW_TOKENS = 6
PROMPTS = 50


def test_kv_cached_greedy_equals_uncached(single_process):
    model = st.trained(st.trained_states()[("sequential", 1)], "sequential", 1)
    for prompt in st.prompts(4):
        assert greedy_generate(model, prompt, NEW_TOKENS, st.MAX_SEQ, st.VOCAB).tokens == st.uncached_greedy(
            model, prompt, NEW_TOKENS
        )


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_drafts_equal_uncached_mtp_after_rollbacks(single_process, mode):
    """Drafts from the per-layer KV caches equal the uncached MTP block's, round after round, whatever number of
    drafts is accepted (drawn at random here, then a random bonus token): the caches roll back correctly."""
    depths = 3
    torch.manual_seed(0)
    model = st.build(mode, depths).eval()
    prompt = st.prompts(1)[0]
    main, drafter = CachedMainModel(model, st.MAX_SEQ), MTPDrafter(model, st.MAX_SEQ, st.VOCAB, depths, False)
    tokens = torch.zeros(st.MAX_SEQ + depths + 1, dtype=torch.long)
    tokens[: len(prompt)] = torch.tensor(prompt)
    _, hidden = main.forward(tokens[: len(prompt)])
    drafter.record_trunk(0, hidden)
    last, generator = len(prompt), torch.Generator().manual_seed(3)
    tokens[last] = 5
    accepted_counts = set()
    for _ in range(8):
        drafts = drafter.draft(tokens, last, depths)
        assert drafts == st.uncached_drafts(model, tokens[: last + 1].tolist(), depths)
        accepted = int(torch.randint(0, depths + 1, (1,), generator=generator))
        _, hidden = main.forward(tokens[last : last + depths + 1])
        drafter.record_trunk(last, hidden)
        main.roll_back(last + accepted + 1)
        drafter.accept(last, accepted)
        tokens[last + accepted + 1] = int(torch.randint(0, st.VOCAB, (1,), generator=generator))
        last += accepted + 1
        accepted_counts.add(accepted)
    assert len(accepted_counts) >= 3  # several rollback lengths were exercised


def _speculative_matches_greedy(model, num_draft_tokens: int, reuse_last_depth: bool = False):
    """Returns the summed speculative stats after asserting every prompt decodes as plain greedy decoding."""
    total = None
    for prompt in st.prompts(PROMPTS):
        plain = greedy_generate(model, prompt, NEW_TOKENS, st.MAX_SEQ, st.VOCAB)
        fast = speculative_generate(
            model, prompt, NEW_TOKENS, st.MAX_SEQ, st.VOCAB, num_draft_tokens, reuse_last_depth
        )
        assert fast.tokens == plain.tokens, f"prompt {prompt}"
        total = fast.stats if total is None else (total.add(fast.stats) or total)
    return total


@pytest.mark.parametrize("mode,depths", st.CASES)
def test_speculative_equals_greedy(single_process, mode, depths):
    stats = _speculative_matches_greedy(st.trained(st.trained_states()[(mode, depths)], mode, depths), depths)
    assert 0 < stats.draft_accepted[0] < stats.draft_proposed[0]  # both accepting and rejecting were exercised
    assert stats.tokens_per_forward > 1.0


def test_speculative_reusing_the_last_depth_equals_greedy(single_process):
    stats = _speculative_matches_greedy(
        st.trained(st.trained_states()[("sequential", 1)], "sequential", 1), 3, reuse_last_depth=True
    )
    assert stats.draft_accepted[1] > 0  # drafts of the reused depth were accepted too


def test_bad_input(single_process):
    torch.manual_seed(0)
    sequential, parallel = st.build("sequential", 1).eval(), st.build("parallel", 2).eval()
    prompt = [1, 2, 3]
    with pytest.raises(ValueError, match="only 1 sequential MTP depths.*--reuse-last-mtp-depth"):
        speculative_generate(sequential, prompt, 4, st.MAX_SEQ, st.VOCAB, 2)
    with pytest.raises(ValueError, match="only 2 parallel heads"):
        speculative_generate(parallel, prompt, 4, st.MAX_SEQ, st.VOCAB, 3, reuse_last_depth=True)
    with pytest.raises(ValueError, match=r"prompt \(46 tokens\) plus 4 new tokens exceed the model's sequence length"):
        speculative_generate(sequential, [1] * 46, 4, st.MAX_SEQ, st.VOCAB, 1)
    with pytest.raises(ValueError, match="exceed the model's sequence length"):
        greedy_generate(sequential, [1] * (st.MAX_SEQ + 1), 1, st.MAX_SEQ, st.VOCAB)
    with pytest.raises(ValueError, match="this model has none"):
        check_draft_settings(MTPConfig(num_layers=0), 1, False)
