"""Megatron-LM 0.19's own ``pretrain()`` through the patched ``pretrain_gpt.py`` with ``--hybrid-layer-pattern``
(megatron-core 0.19+; the 0.19 suite runs this), on CPU: megatron_mtp builds ``MTPHybridModel`` with the
pattern's MTP parts as its depths (Megatron-LM infers ``--mtp-num-layers`` from them), and it trains, with the
per-depth metrics in Megatron-LM's log."""

import math

import pytest
from megatron_lm_files import logged_iterations, patched_pretrain_gpt, run_pretrain_gpt

from megatron_mtp.compat import HAS_HYBRID_MODEL

pytestmark = pytest.mark.skipif(
    not HAS_HYBRID_MODEL, reason="Megatron-Core has HybridModel from 0.19 (megatron.core.models.hybrid); the 0.19 suite runs this"
)


def test_hybrid_layer_pattern_builds_mtp_hybrid_model_and_trains(tmp_path):
    script = patched_pretrain_gpt(str(tmp_path))
    flags = ["--hybrid-layer-pattern", "*-*-/*-/*-", "--mtp-mode", "sequential", "--train-iters", "3"]
    stdout = run_pretrain_gpt(script, 1, flags)
    assert "building hybrid model '*-*-/*-/*-' with megatron_mtp MTP (sequential, D=2)" in stdout
    log = logged_iterations(stdout)
    assert set(log) == {1, 2, 3}, stdout[-3000:]
    for iteration, entries in log.items():
        for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
            assert math.isfinite(entries[key]) and 0 < entries[key] < 2 * math.log(128), (iteration, key)
