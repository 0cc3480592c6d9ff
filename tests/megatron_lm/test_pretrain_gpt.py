"""Megatron-LM's own ``pretrain()`` through the patched ``pretrain_gpt.py``, on CPU, two processes.

The release matching the installed megatron-core (core_v0.16.1 or core_r0.19.0) runs a tiny GPT for three
iterations on mock data at TP=2 (sequential MTP), at PP=2 (parallel heads, untied) and at PP=2 with two virtual
stages per rank (sequential MTP, interleaved 1F1B), with megatron_mtp's per-depth metrics in Megatron-LM's
log and TensorBoard; a checkpoint saved by Megatron-LM at iteration 2 is resumed and iteration 3 is repeated.
"""

import math
import os

import pytest
from megatron_lm_files import (
    RELEASES,
    logged_iterations,
    megatron_lm_dir,
    patched_pretrain_gpt,
    run_pretrain_gpt,
    tensorboard_scalars,
)

DEPTHS = 2
MTP_KEYS = [f"mtp_{depth} {name}" for depth in range(1, DEPTHS + 1) for name in ("loss", "acc", "acc_main")]
PARALLELISM = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2vp2": ["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-virtual-stages-per-pipeline-rank", "2"],
}
ITERATIONS = {1, 2, 3}


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    return patched_pretrain_gpt(str(tmp_path_factory.mktemp("megatron_lm")))


def _mtp_flags(mode):
    return ["--mtp-num-layers", str(DEPTHS), "--mtp-mode", mode, "--train-iters", "3"]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=2e-6, abs_tol=1e-9)  # Megatron-LM prints 7 significant digits


@pytest.fixture(scope="module")
def saved_runs(script, tmp_path_factory):
    """One run per (parallelism, mode) that saves at iterations 2 and 3 and writes TensorBoard."""
    runs = {}

    def run(parallelism, mode, *extra):
        key = (parallelism, mode, extra)
        if key not in runs:
            directory = tmp_path_factory.mktemp(f"{parallelism}_{mode}")
            checkpoints, tensorboard = str(directory / "checkpoints"), str(directory / "tensorboard")
            flags = [*PARALLELISM[parallelism], *_mtp_flags(mode), *extra, "--save", checkpoints,
                     "--save-interval", "2", "--tensorboard-dir", tensorboard]
            runs[key] = (run_pretrain_gpt(script, 2, flags), checkpoints, tensorboard)
        return runs[key]

    return run


@pytest.mark.parametrize(
    "parallelism, mode, extra",
    [
        ("tp2", "sequential", ()),
        ("pp2", "parallel", ("--untie-embeddings-and-output-weights",)),
        ("pp2vp2", "sequential", ()),
    ],
)
def test_trains_logs_per_depth_metrics_and_resumes(script, saved_runs, parallelism, mode, extra):
    stdout, checkpoints, tensorboard = saved_runs(parallelism, mode, *extra)
    log = logged_iterations(stdout)
    assert set(log) == ITERATIONS, stdout[-3000:]
    scalars = tensorboard_scalars(tensorboard)
    for key in ["lm loss", *MTP_KEYS]:
        assert set(scalars[key]) == ITERATIONS, key
    for iteration in ITERATIONS:
        for depth in range(1, DEPTHS + 1):
            assert 0 <= scalars[f"mtp_{depth} acc"][iteration] <= 1
            assert 0 <= scalars[f"mtp_{depth} acc_main"][iteration] <= 1
        # Megatron-LM prints the entries that are not 0 (the losses always; accuracies of an untrained model
        # may be 0), averaged since the previous line: iteration 1's are that iteration's TensorBoard values.
        assert {"lm loss", "mtp_1 loss", "mtp_2 loss"} <= set(log[iteration])
    for key, value in log[1].items():
        if key in MTP_KEYS:
            assert _close(value, scalars[key][1]), key
    assert any(scalars[f"mtp_{depth} acc"][i] > 0 for depth in (1, 2) for i in ITERATIONS)
    assert scalars["lm loss"][3] < scalars["lm loss"][1]

    resumed_tensorboard = os.path.join(os.path.dirname(tensorboard), "resumed_tensorboard")
    resumed_log = logged_iterations(
        run_pretrain_gpt(script, 2, [*PARALLELISM[parallelism], *_mtp_flags(mode), *extra, "--load", checkpoints,
                                     "--ckpt-step", "2", "--tensorboard-dir", resumed_tensorboard])
    )
    assert set(resumed_log) == {3}
    resumed = tensorboard_scalars(resumed_tensorboard)
    for key in ["lm loss", "grad-norm", *MTP_KEYS]:
        assert set(resumed[key]) == {3}, key
        assert _close(resumed[key][3], scalars[key][3]), (key, resumed[key][3], scalars[key][3])


def test_tensor_parallel_equals_one_process(script, saved_runs):
    """The TP=2 run's logged losses equal a one-process run's (same initial weights: CPU initialisation).

    Megatron-LM pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by`` (128) times the TP size,
    and the padded entries take part in the softmax: the one-process run pads to 256 as TP=2 does. (core_r0.19.0's
    NullTokenizer counts 128 tokens for ``--vocab-size 128``, its EOD inside, where core_v0.16.1's counts 129.)
    """
    tp2 = logged_iterations(saved_runs("tp2", "sequential")[0])
    one = logged_iterations(
        run_pretrain_gpt(script, 1, ["--make-vocab-size-divisible-by", "256", *_mtp_flags("sequential")])
    )
    for iteration in ITERATIONS:
        for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
            assert math.isclose(tp2[iteration][key], one[iteration][key], rel_tol=1e-5), (iteration, key)


@pytest.mark.parametrize("release", RELEASES)
def test_patch_applies_to_a_stock_checkout(tmp_path, release):
    megatron_lm_dir(release)
    script = patched_pretrain_gpt(str(tmp_path), release)
    with open(script) as f:
        text = f.read()
    assert "mtp_forward_step(forward_step)" in text and "get_embedding_ranks=mtp_get_embedding_ranks" in text
