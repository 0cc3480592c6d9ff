"""Megatron-LM 0.19's own ``pretrain()`` through the patched ``pretrain_gpt.py`` with ``--hybrid-layer-pattern``
(megatron-core 0.19+; the 0.19 suite runs this), on CPU: megatron_mtp builds ``MTPHybridModel`` with the
pattern's MTP parts as its depths (Megatron-LM infers ``--mtp-num-layers`` and ``--num-layers`` from the pattern).
An attention + MLP pattern is the 2-layer GPT layer for layer (same initialisation order and scale), so Megatron-LM
logs the same losses and per-depth MTP losses for both."""

import pytest
from megatron_lm_files import logged_iterations, patched_pretrain_gpt, run_pretrain_gpt

from megatron_mtp.compat import HAS_HYBRID_MODEL

pytestmark = pytest.mark.skipif(
    not HAS_HYBRID_MODEL,
    reason="Megatron-Core has HybridModel from 0.19 (megatron.core.models.hybrid); the 0.19 suite runs this",
)
MTP = ["--mtp-num-layers", "2", "--mtp-mode", "sequential", "--train-iters", "3"]


def test_hybrid_layer_pattern_builds_mtp_hybrid_model_that_trains_as_the_gpt(tmp_path):
    script = patched_pretrain_gpt(str(tmp_path))
    gpt = run_pretrain_gpt(script, 1, MTP)  # TINY_GPT: 2 layers
    hybrid = run_pretrain_gpt(script, 1, [*MTP, "--hybrid-layer-pattern", "*-*-/*-/*-"])
    assert "building hybrid model '*-*-/*-/*-' with megatron_mtp MTP (sequential, D=2)" in hybrid
    gpt_log, hybrid_log = logged_iterations(gpt), logged_iterations(hybrid)
    assert set(gpt_log) == set(hybrid_log) == {1, 2, 3}, hybrid[-3000:]
    for iteration in (1, 2, 3):
        for key in ("lm loss", "mtp_1 loss", "mtp_2 loss", "grad norm"):
            assert hybrid_log[iteration][key] == gpt_log[iteration][key], (iteration, key)  # as printed: 7 digits
