"""Speculative decoding at TP=2: one spawned world decodes 50 prompts with each test model (sequential and
parallel, D=1 and D=3), plain greedy and speculative; both must give the same tokens, and the same as at TP=1.

It runs in the newest supported release's suite only: what differs between releases in decoding is the static
inference context (``compat.static_inference_context``), which the TP=1 tests cover in both suites, and the TP=2
world is the costliest test of the suite."""

import pytest
import speculative_tiny as st

from megatron_mtp.compat import MEGATRON_CORE_VERSION
from mp_world import run_world
from megatron_mtp.inference import greedy_generate, speculative_generate

NEW_TOKENS = 6
PROMPTS = 50


def _decode_every_case(states):
    decoded = {}
    for (mode, depths), state in states.items():
        model = st.trained(state, mode, depths, tp=2)
        runs = []
        for prompt in st.prompts(PROMPTS):
            plain = greedy_generate(model, prompt, NEW_TOKENS, st.MAX_SEQ, st.VOCAB)
            fast = speculative_generate(model, prompt, NEW_TOKENS, st.MAX_SEQ, st.VOCAB, depths)
            runs.append((plain.tokens, fast.tokens, fast.stats.draft_accepted[0]))
        decoded[(mode, depths)] = runs
    return decoded


@pytest.mark.skipif(MEGATRON_CORE_VERSION.minor < 19, reason="runs in the megatron-core 0.19 suite (module docstring)")
def test_speculative_equals_greedy_at_tp2(single_process):
    states = st.trained_states()
    ranks = run_world(_decode_every_case, 2, states, tp=2, timeout=1800)
    assert ranks[0] == ranks[1]
    for (mode, depths), runs in ranks[0].items():
        model = st.trained(states[(mode, depths)], mode, depths)
        for prompt, (plain, fast, _) in zip(st.prompts(PROMPTS), runs):
            assert fast == plain, f"{mode} D={depths}, prompt {prompt}"
            assert plain == greedy_generate(model, prompt, NEW_TOKENS, st.MAX_SEQ, st.VOCAB).tokens
        assert sum(accepted for _, _, accepted in runs) > 0, f"{mode} D={depths}: no draft was ever accepted"
