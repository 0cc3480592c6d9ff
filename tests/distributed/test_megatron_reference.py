"""Sequential MTP equals Megatron-Core's own MTP (``GPTModel`` with ``get_gpt_mtp_block_spec``) under
parallelism: TP=2 with sequence parallelism, PP=2 (1F1B) and EP=2, the last two with MoE layers (MoE MTP layers
too) and their aux losses on. Each rank builds both models' stage, copies Megatron-Core's weights into ours by
name (strict, but for a weight Megatron-Core allocates and never uses), runs one Megatron training step on each,
and compares the per-micro-batch LM loss, the per-depth MTP losses, Megatron-Core's per-layer MoE aux-loss log
and every gradient.

One deliberate difference: the positions past the sequence end, where a depth has no target, read token 0's
embedding in both, but ours passes no gradient back into it (see docs/design.md). Dense layers send none there
anyway; MoE MTP layers' aux losses, which count every position, make Megatron-Core's row 0 of the word-embedding
gradient differ from ours, and only that row.
"""

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_mtp.compat import megatron_core_mtp_logged_losses, moe_aux_loss_values, reset_moe_aux_loss_log
from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from mp_world import run_world
from tiny import build_megatron_core_model, build_model, grad_of, make_batches, train_step, transformer_config, wrap_ddp

DEPTHS = 2
MICROBATCHES = 3
MOE = dict(num_experts=4, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


def _compare_with_megatron_core(settings: dict, tied: bool) -> dict:
    """In each rank: both models on this stage, the same weights and data; returns what the test checks."""
    mtp = MTPConfig(num_layers=DEPTHS)
    reference = build_megatron_core_model(transformer_config(mtp, **settings), tied=tied)
    ours = build_model(transformer_config(mtp, **settings), mtp, tied=tied)
    weights = reference.state_dict()
    if tied and not parallel_state.is_pipeline_first_stage():
        # On its MTP stage Megatron-Core allocates an output weight it never uses: the embedding copy serves as
        # the output weight there. Ours has none.
        weights.pop("output_layer.weight")
    ours.load_state_dict(weights, strict=True)
    batches = make_batches(MICROBATCHES)
    last_stage = parallel_state.is_pipeline_last_stage()

    results = {}
    for label, model in (("reference", reference), ("ours", ours)):
        model = wrap_ddp(model, model.config)
        MTPLossLoggingHelper.tracker.clear()
        reset_moe_aux_loss_log()
        stats = MTPStats(DEPTHS) if label == "ours" else None
        losses = train_step(model, model.config, batches, stats)
        if label == "reference":
            # Megatron-Core logs each micro-batch's mean loss per depth; every micro-batch masks the same positions
            # (tiny.make_batches), so their mean is the token-weighted mean that MTPStats gives.
            depth_losses = megatron_core_mtp_logged_losses() / MICROBATCHES if last_stage else None
        else:
            summary = stats.summary()
            depth_losses = torch.tensor([summary[f"mtp_{k}_loss"] for k in range(1, DEPTHS + 1)]) if last_stage else None
        results[label] = dict(
            losses=losses,
            depth_losses=depth_losses,
            moe_log={name: values.clone() for name, values in moe_aux_loss_values().items()},
            grads={name: grad_of(p).clone() for name, p in model.module.named_parameters()},
        )
    results["last_stage"] = last_stage
    results["unused_reference_weights"] = sorted(set(reference.state_dict()) - set(weights))
    results["masks_equal"] = all(torch.equal(b["loss_mask"], batches[0]["loss_mask"]) for b in batches)
    return results


def _check(rank_results, expect_moe: str = ""):
    """expect_moe: the load-balancing loss Megatron-Core's MoE log must hold besides ``z_loss`` ("": dense)."""
    for rank, result in enumerate(rank_results):
        reference, ours = result["reference"], result["ours"]
        assert result["masks_equal"]
        unused = sorted(set(reference["grads"]) - set(ours["grads"]))
        assert unused == result["unused_reference_weights"], f"rank {rank}: parameters differ: {unused}"
        assert all(reference["grads"][name].abs().max() == 0 for name in unused), f"rank {rank}: {unused} used"
        assert not set(ours["grads"]) - set(reference["grads"]), f"rank {rank}: parameters differ"
        assert any(".experts." in name for name in ours["grads"]) == bool(expect_moe)
        logged = sorted(["z_loss", expect_moe] if expect_moe else [])
        assert sorted(ours["moe_log"]) == sorted(reference["moe_log"]) == logged, f"rank {rank}"
        for name, values in ours["moe_log"].items():
            torch.testing.assert_close(values, reference["moe_log"][name], atol=1e-5, rtol=0, msg=f"rank {rank} {name}")
        for name, grad in ours["grads"].items():
            expected = reference["grads"][name]
            if expect_moe and name == "embedding.word_embeddings.weight":  # the tail's aux-loss share in row 0
                grad, expected = grad[1:], expected[1:]
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0, msg=f"rank {rank} {name}")
        if result["last_stage"]:
            for depth in range(DEPTHS):  # the comparison means something only if MTP gradients flow
                assert ours["grads"][f"mtp.layers.{depth}.eh_proj.weight"].abs().max() > 0, f"rank {rank} {depth}"
            torch.testing.assert_close(torch.stack(ours["losses"]), torch.stack(reference["losses"]), atol=1e-5, rtol=0)
            torch.testing.assert_close(ours["depth_losses"].float(), reference["depth_losses"], atol=1e-5, rtol=0)
        else:
            assert ours["losses"] == reference["losses"] == []


def test_tensor_parallel_2_with_sequence_parallel(single_process):
    rank_results = run_world(_compare_with_megatron_core, 2, dict(tp=2, sp=True), True, tp=2)
    _check(rank_results)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pipeline_parallel_2_moe_with_aux_losses(single_process, tied):
    rank_results = run_world(_compare_with_megatron_core, 2, dict(pp=2, **MOE), tied, pp=2)
    _check(rank_results, expect_moe="load_balancing_loss")


def test_expert_parallel_2_moe_with_sequence_aux_loss(single_process):
    settings = dict(ep=2, moe_router_load_balancing_type="seq_aux_loss", **MOE)
    rank_results = run_world(_compare_with_megatron_core, 2, settings, False, ep=2)
    _check(rank_results, expect_moe="seq_load_balancing_loss")
