"""The pretrain script with --hybrid-layer-pattern (megatron-core 0.19+; the 0.19 suite runs this): a hybrid model
with attention, MLP and MoE layers and sequential MTP trains, and a run resumed from its checkpoint logs the very
losses and gradient norms of the uninterrupted run."""

import pytest

from megatron_mtp.compat import HAS_HYBRID_MODEL
from test_pretrain import read_log, run, tiny_data  # noqa: F401 (tiny_data: a fixture)

pytestmark = pytest.mark.skipif(
    not HAS_HYBRID_MODEL, reason="Megatron-Core has HybridModel from 0.19 (megatron.core.models.hybrid); the 0.19 suite runs this"
)
HYBRID = ["--hybrid-layer-pattern", "*-E*/*E/*E", "--num-layers", "4", "--mtp-num-layers", "2", "--num-experts", "4",
          "--disable-bias-linear", "--moe-aux-loss-coeff", "1e-2", "--train-iters", "4", "--lr-decay-iters", "4"]


def test_hybrid_layer_pattern_trains_and_resumes_bit_exact(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    straight = tmp_path / "straight.jsonl"
    run(1, [*HYBRID, "--save", str(save), "--save-interval", "2", "--json-log", str(straight)], tiny_data)
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = tmp_path / "resumed.jsonl"
    run(1, [*HYBRID, "--load", str(save), "--json-log", str(resumed)], tiny_data)

    straight_log, resumed_log = read_log(straight), read_log(resumed)
    assert sorted(straight_log) == [1, 2, 3, 4] and sorted(resumed_log) == [3, 4]
    assert straight_log[4]["lm_loss"] < straight_log[1]["lm_loss"]
    for iteration in (3, 4):
        for key in ("lm_loss", "mtp_1_loss", "mtp_2_loss", "grad_norm"):
            assert resumed_log[iteration][key] == straight_log[iteration][key], (iteration, key)
