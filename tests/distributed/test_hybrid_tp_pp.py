"""MTP on HybridModel (0.19+; the 0.19 suite runs these): TP=2 (sequential with sequence parallelism, parallel
heads) and PP=2 (sequential, tied output, 1F1B over several micro-batches) give one process's losses, MTP metrics
and gradients. The pattern mixes attention, MLP and MoE layers (aux losses on), in the decoder and the MTP depths.
The one-process reference uses the plain MTP loss, the parallel runs the chunked one (5-token chunks)."""

import pytest
import torch

from megatron.core import parallel_state

from megatron_mtp.compat import HAS_HYBRID_MODEL
from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from mp_world import run_world
from tiny import global_names, grad_of, load_full_state, make_batches, max_grad_diffs, train_step, wrap_ddp

pytestmark = pytest.mark.skipif(
    not HAS_HYBRID_MODEL,
    reason="Megatron-Core has HybridModel from 0.19 (megatron.core.models.hybrid); the 0.19 suite runs this",
)
if HAS_HYBRID_MODEL:
    from hybrid_tiny import build_hybrid_model, hybrid_config

MICROBATCHES = 3
MOE = dict(num_experts=4, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
# (mode, sequence_parallel, tied output)
TP_CASES = [("sequential", True, False), ("parallel", True, False)]  # Megatron-Core needs SP for MoE under TP
PP_CASES = [("sequential", False, True)]


def _mtp_config(mode: str, reference: bool) -> MTPConfig:
    return MTPConfig(
        num_layers=2, mode=mode, loss_implementation="plain" if reference else "chunked", loss_chunk_size=5
    )


def _run_cases(cases, references=None):
    """Each case at this world's TP/PP: weights loaded from ``references`` (one process's) when given; returns
    initial weights, per-micro-batch LM loss reports, MTP counts and gradients (as their grad differences to the
    reference's when given)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    results = []
    for index, (mode, sp, tied) in enumerate(cases):
        mtp = _mtp_config(mode, reference=references is None)
        config = hybrid_config(mtp, tp=tp, pp=pp, sp=sp and tp > 1, **MOE)
        model = build_hybrid_model(config, mtp, tied=tied)
        if references is not None:
            load_full_state(model, _tied_aliases(references[index]["weights"], model))
        weights = {name: p.detach().clone() for name, p in global_names(model).items()}
        model = wrap_ddp(model, config)
        stats = MTPStats(2)
        losses = train_step(model, config, make_batches(MICROBATCHES), stats)
        result = dict(last_stage=parallel_state.is_pipeline_last_stage(), losses=losses, stats=stats.values)
        if references is None:
            result.update(weights=weights, grads={name: grad_of(p).clone() for name, p in global_names(model).items()})
        else:
            result["grad_diffs"] = max_grad_diffs(model, _tied_aliases(references[index]["grads"], model))
            result["mtp_params"] = [name for name in global_names(model) if name.startswith("mtp.")]
        results.append(result)
    return results


def _tied_aliases(tensors, model):
    """A tied last stage (PP) holds the word embedding as ``output_layer.weight``; one process has only one."""
    if "output_layer.weight" in global_names(model) and "output_layer.weight" not in tensors:
        tensors = dict(tensors, **{"output_layer.weight": tensors["embedding.word_embeddings.weight"]})
    return tensors


def _mean_losses(reports):
    """Per-micro-batch mean LM loss from [loss sum, token count] reports."""
    sums, tokens = torch.stack(reports).unbind(dim=1)
    return sums / tokens


def _check(cases, world, tp, pp):
    references = _run_cases(cases)
    rank_results = run_world(_run_cases, world, cases, references, tp=tp, pp=pp)
    for index, case in enumerate(cases):
        for rank, results in enumerate(rank_results):
            result = results[index]
            bad = {name: diff for name, diff in result["grad_diffs"].items() if diff > 1e-5}
            assert not bad, f"{case} rank {rank}: gradients differ from one process: {bad}"
            assert bool(result["mtp_params"]) == result["last_stage"], f"{case} rank {rank}"
            if result["last_stage"]:
                torch.testing.assert_close(
                    _mean_losses(result["losses"]), _mean_losses(references[index]["losses"]), atol=1e-5, rtol=0
                )
                torch.testing.assert_close(result["stats"], references[index]["stats"], atol=1e-4, rtol=0)
            else:
                assert result["losses"] == []


def test_tensor_parallel_2_equals_one_process(single_process):
    _check(TP_CASES, world=2, tp=2, pp=1)


def test_pipeline_parallel_2_equals_one_process(single_process):
    _check(PP_CASES, world=2, tp=1, pp=2)
