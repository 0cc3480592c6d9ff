"""MoE decoder layers (local spec, allgather dispatcher) with an MoE MTP layer, at EP=2 over two processes.

Both ranks also form a data-parallel pair for the dense weights; they get the same data, so every loss and
(DP-averaged) gradient must equal one process's on that data.
"""

import torch

from megatron.core import parallel_state

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from mp_world import run_world
from tiny import build_model, global_names, grad_of, load_full_state, make_batches, max_grad_diffs, train_step, transformer_config, wrap_ddp

EXPERTS = 4
MODES = ("sequential", "parallel")


def _reference():
    results = []
    for mode in MODES:
        mtp = MTPConfig(num_layers=1, mode=mode)
        config = transformer_config(mtp, num_layers=2, num_experts=EXPERTS)
        model = wrap_ddp(build_model(config, mtp), config)
        weights = {name: p.detach().clone() for name, p in global_names(model).items()}
        stats = MTPStats(1)
        losses = train_step(model, config, make_batches(2), stats)
        grads = {name: grad_of(p).clone() for name, p in global_names(model).items()}
        results.append(dict(weights=weights, losses=losses, stats=stats.values, grads=grads))
    return results


def _expert_parallel_run(references):
    ep = parallel_state.get_expert_model_parallel_world_size()
    out = []
    for mode, reference in zip(MODES, references):
        mtp = MTPConfig(num_layers=1, mode=mode)
        config = transformer_config(mtp, num_layers=2, num_experts=EXPERTS, ep=ep)
        model = build_model(config, mtp)
        load_full_state(model, reference["weights"])
        model = wrap_ddp(model, config)
        stats = MTPStats(1)
        losses = train_step(model, config, make_batches(2), stats)
        names = global_names(model)
        out.append(
            dict(
                losses=losses,
                stats=stats.values,
                grad_diffs=max_grad_diffs(model, reference["grads"]),
                mtp_expert_params=[n for n in names if n.startswith("mtp.") and ".experts." in n],
            )
        )
    return out


def test_moe_decoder_and_moe_mtp_layer_at_expert_parallel_2(single_process):
    references = _reference()
    rank_results = run_world(_expert_parallel_run, 2, references, ep=2)
    for mode_index, mode in enumerate(MODES):
        reference = references[mode_index]
        for rank, results in enumerate(rank_results):
            result = results[mode_index]
            assert len(result["mtp_expert_params"]) > 0, f"{mode}: the MTP layer is not MoE"
            bad = {n: d for n, d in result["grad_diffs"].items() if d > 1e-5}
            assert not bad, f"{mode} rank {rank}: gradients differ from one process: {bad}"
            torch.testing.assert_close(torch.stack(result["losses"]), torch.stack(reference["losses"]), atol=1e-4, rtol=1e-6)
            torch.testing.assert_close(result["stats"], reference["stats"], atol=1e-4, rtol=1e-6)
