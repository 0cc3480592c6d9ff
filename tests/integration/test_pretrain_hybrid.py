"""The pretrain script with --hybrid-layer-pattern (megatron-core 0.19+; the 0.19 suite runs this).

A hybrid attention + MLP pattern (``"*-*-/*-/*-"``) is the 2-layer GPT of the same flags layer for layer: its
attention and MLP layers are a transformer layer's two halves, initialised in the same order and scale (Megatron-LM's
``is_hybrid_model`` output-layer init), so the runs log the same losses, MTP losses and gradient norms. A run
resumed from the hybrid run's checkpoint repeats its last iteration exactly."""

import pytest

from megatron_mtp.compat import HAS_HYBRID_MODEL
from test_pretrain import read_log, run

pytestmark = pytest.mark.skipif(
    not HAS_HYBRID_MODEL,
    reason="Megatron-Core has HybridModel from 0.19 (megatron.core.models.hybrid); the 0.19 suite runs this",
)
KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss", "grad_norm")
HYBRID = ["--hybrid-layer-pattern", "*-*-/*-/*-", "--num-layers", "4", "--train-iters", "3"]


def test_hybrid_pattern_trains_as_the_gpt_with_the_same_layers_and_resumes_bit_exact(tiny_data, tmp_path):
    gpt, hybrid, resumed = (tmp_path / f"{name}.jsonl" for name in ("gpt", "hybrid", "resumed"))
    save = tmp_path / "ckpt"
    run(1, ["--train-iters", "3", "--json-log", str(gpt)], tiny_data)  # TINY: 2 layers, 2 MTP depths
    run(1, [*HYBRID, "--save", str(save), "--save-interval", "2", "--json-log", str(hybrid)], tiny_data)
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    run(1, [*HYBRID, "--load", str(save), "--json-log", str(resumed)], tiny_data)

    gpt_log, hybrid_log, resumed_log = read_log(gpt), read_log(hybrid), read_log(resumed)
    assert sorted(gpt_log) == sorted(hybrid_log) == [1, 2, 3] and sorted(resumed_log) == [3]
    assert hybrid_log[3]["lm_loss"] < hybrid_log[1]["lm_loss"]
    for iteration in (1, 2, 3):
        for key in KEYS:
            assert hybrid_log[iteration][key] == pytest.approx(gpt_log[iteration][key], abs=1e-6), (iteration, key)
    assert {key: resumed_log[3][key] for key in KEYS} == {key: hybrid_log[3][key] for key in KEYS}
