"""bf16 with Megatron-Core's distributed optimizer at DP=2 (two spawned gloo processes) trains exactly as its
non-distributed bf16 optimizer does in one process on the same global batch, for both MTP modes.

Each rank runs one of the two micro-batches the one-process reference runs. Per micro-batch the bf16 forward
and backward are the same computation in both, the fp32 ``main_grad`` sums are the same two terms (the 1/2 of
the data-parallel average and of the two-micro-batch average is exact), and Adam updates fp32 main parameters
element by element in both. What differs is the order in which the clipping norm sums its squares (a sharded
norm, all-reduced), a last-bit fp32 difference in the clipping factor; after three steps the losses agree to
1e-5 relative (seen: equal) and every bf16 parameter to one unit in its last place (2^-7 relative), or 1e-6 where
a weight passes zero (an Adam step here is up to 3e-3; seen: one weight of 9e-8 off by 5e-10, all others equal)."""

import torch

from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from mp_world import run_world
from tiny import adam, build_model, global_names, load_full_state, make_batches, train_step, transformer_config, wrap_ddp

MODES = [("sequential", True), ("parallel", False)]  # (mode, tied output layer)
STEPS = 3
LR = 3e-3


def _train(mode: str, tied: bool, weights, use_distributed_optimizer: bool):
    """Three bf16 Adam steps on fixed micro-batches (one per data-parallel rank, both in one process).
    Returns per-step [loss sum, tokens] of each micro-batch run here, MTP counts, and the final bf16 weights."""
    mtp = MTPConfig(num_layers=2, mode=mode)
    config = transformer_config(mtp, bf16=True)
    model = build_model(config, mtp, tied=tied)
    load_full_state(model, weights)
    model = wrap_ddp(model, config, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = adam(model, config, lr=LR, use_distributed_optimizer=use_distributed_optimizer)
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    assert any(isinstance(part, DistributedOptimizer) for part in parts) == use_distributed_optimizer
    batches = make_batches(2)
    if use_distributed_optimizer:
        batches = [batches[parallel_state.get_data_parallel_rank()]]
    losses, stats = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        step_stats = MTPStats(mtp.num_layers)
        losses.append(torch.stack(train_step(model, config, batches, step_stats)))
        assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
        succeeded, _, _ = optimizer.step()
        assert succeeded
        step_stats.all_reduce(parallel_state.get_data_parallel_group())
        stats.append(step_stats.values)
    final = {name: p.detach().clone() for name, p in global_names(model).items()}
    return dict(losses=torch.stack(losses), stats=torch.stack(stats), weights=final)


def _distributed_runs(cases):
    return [_train(mode, tied, weights, use_distributed_optimizer=True) for mode, tied, weights in cases]


def test_distributed_optimizer_at_dp2_equals_one_process_in_bf16(single_process):
    cases, references = [], []
    for mode, tied in MODES:
        torch.manual_seed(0)
        mtp = MTPConfig(num_layers=2, mode=mode)
        model = build_model(transformer_config(mtp, bf16=True), mtp, tied=tied)
        initial = {name: p.detach().clone() for name, p in global_names(model).items()}
        cases.append((mode, tied, initial))
        references.append(_train(mode, tied, initial, use_distributed_optimizer=False))
    ranks = run_world(_distributed_runs, 2, cases)
    for (mode, tied, _), reference, *per_rank in zip(cases, references, *ranks):
        first, last = reference["losses"][0], reference["losses"][-1]
        assert (last[:, 0] / last[:, 1] < 0.95 * first[:, 0] / first[:, 1]).all(), (mode, reference["losses"])
        for rank, result in enumerate(per_rank):
            torch.testing.assert_close(result["losses"][:, 0], reference["losses"][:, rank], rtol=1e-5, atol=0)
            torch.testing.assert_close(result["stats"], reference["stats"], rtol=1e-5, atol=1e-5)
            for name, weight in reference["weights"].items():
                assert result["weights"][name].dtype == torch.bfloat16
                # One bf16 rounding of the weight, or of the Adam updates (about lr each), per step: the two runs
                # apply the micro-batch scale at different points (in the loss on one rank, in the DP average).
                torch.testing.assert_close(
                    result["weights"][name].float(), weight.float(), rtol=2**-7, atol=STEPS * LR * 2**-7,
                    msg=f"{mode} {name}",
                )
