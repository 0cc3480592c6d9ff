"""TP=2, PP=2 (1F1B, several micro-batches), PP=2 with two virtual stages per rank (interleaved 1F1B; also with a
Megatron-Core pipeline layout that gives MTP a stage of its own, beside the loss) and TP=2 x PP=2 give one
process's losses, MTP metrics and gradients, for both MTP modes; SP at TP=2; MTP only on the last stage (its last
virtual stage). Under PP (the only place a rank holds a second copy of the word embedding) the copies stay equal
after optimizer steps, shard by shard. Each test spawns one gloo world and runs several cases in it.

The one-process reference uses the plain MTP loss (full logits); the parallel runs use the chunked loss
(5-token chunks, which do not divide the tokens), alternating gradients-in-forward and recomputation, so
these tests also show the two loss paths agree under TP, SP and PP. Cases with SP or tied weights add the
latent semantic enhancement losses (gathered over the sequence under SP, embedding copy under PP)."""

from typing import NamedTuple, Optional

import torch

from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from mp_world import run_world
from tiny import (
    build_chunks,
    global_names,
    grad_of,
    load_full_state,
    make_batches,
    max_grad_diffs,
    train_step,
    transformer_config,
    wrap_ddp_chunks,
)

MICROBATCHES = 4


class Case(NamedTuple):
    mode: str
    sp: bool  # sequence parallel
    tied: bool  # output layer tied to the word embedding
    layout: Optional[str] = None  # Megatron-Core's pipeline_model_parallel_layout, 4 decoder layers


TP_CASES = [
    Case("sequential", False, False),
    Case("sequential", True, False),
    Case("sequential", True, True),
    Case("parallel", False, False),
    Case("parallel", True, False),
]
PP_CASES = [
    Case("sequential", False, False),
    Case("sequential", False, True),
    Case("parallel", False, False),
    Case("parallel", False, True),
]
# PP=2 x 2 virtual stages: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3 (MTP and the loss).
VIRTUAL_PP_CASES = [
    Case("sequential", False, False),
    Case("sequential", False, True),
    Case("parallel", False, True),
    Case("sequential", False, False, layout="Et|t|tt|mmL"),  # MTP in the last stage without decoder layers
    Case("parallel", False, False, layout="Et|t|tt|L"),  # parallel heads are not layers of Megatron-Core's layout
]
TP_PP_CASES = [
    Case("sequential", True, False),
    Case("parallel", False, True),
]


def _mtp_config(case: Case, case_index: int, reference: bool) -> MTPConfig:
    mode, sp, tied = case.mode, case.sp, case.tied
    latent = 0.3 if sp or tied else 0.0
    return MTPConfig(
        num_layers=2,
        mode=mode,
        depth_weighting="harmonic",
        loss_implementation="plain" if reference else "chunked",
        loss_chunk_size=5,
        loss_recompute_logits=case_index % 2 == 1,
        latent_consistency_weight=latent,
        semantic_anchoring_weight=latent / 2,
    )


def _reference(cases, microbatches):
    """One-process results per case: initial weights, per-micro-batch LM loss, MTP counts, gradients."""
    results = []
    for case_index, case in enumerate(cases):
        mtp = _mtp_config(case, case_index, reference=True)
        config = transformer_config(mtp)
        (model,) = wrap_ddp_chunks(build_chunks(config, mtp, tied=case.tied), config)
        weights = {name: p.detach().clone() for name, p in global_names(model).items()}
        stats = MTPStats(2)
        losses = train_step(model, config, make_batches(microbatches, fully_masked_microbatch=1), stats)
        grads = {name: grad_of(p).clone() for name, p in global_names(model).items()}
        results.append(dict(weights=weights, losses=losses, stats=stats.values, grads=grads))
    return results


def _parallel_run(cases, references, microbatches, optimizer_steps):
    """Runs in every rank: same cases at this world's TP/PP, compared locally with the reference."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    out = []
    for case_index, (case, reference) in enumerate(zip(cases, references, strict=True)):
        mtp = _mtp_config(case, case_index, reference=False)
        settings = dict(pipeline_model_parallel_layout=case.layout) if case.layout else {}
        if vpp:  # the interleaved schedule's p2p settings, as Megatron-LM's (see training/setup.py)
            settings.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        config = transformer_config(
            mtp, tp=tp, pp=pp, sp=case.sp, virtual_pipeline_model_parallel_size=vpp, **settings
        )
        model = build_chunks(config, mtp, tied=case.tied)
        load_full_state(model, _tied_aliases(reference["weights"], model))
        model = wrap_ddp_chunks(model, config)
        stats = MTPStats(2)
        losses = train_step(model, config, make_batches(microbatches, fully_masked_microbatch=1), stats)
        diffs = max_grad_diffs(model, _tied_aliases(reference["grads"], model))
        result = dict(
            last_stage=parallel_state.is_pipeline_last_stage(),
            first_stage=parallel_state.is_pipeline_first_stage(),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            mtp_params=sorted(name for name in global_names(model) if name.startswith("mtp.")),
            losses=losses,
            stats=stats.values,
            grad_diffs=diffs,
        )
        if optimizer_steps:
            optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), model)
            for step in range(optimizer_steps):
                if step:
                    optimizer.zero_grad()
                    train_step(model, config, make_batches(microbatches, seed=step))
                optimizer.step()
            core = (model[0] if parallel_state.is_pipeline_first_stage() else model[-1]).module
            if hasattr(core, "embedding"):
                result["embedding"] = core.embedding.word_embeddings.weight.detach().clone()
            elif case.tied:
                result["embedding"] = core.output_layer.weight.detach().clone()
        out.append(result)
    return out


def _tied_aliases(tensors, model):
    """A tied last stage holds the word embedding as ``output_layer.weight``; the reference has only one."""
    names = global_names(model)
    if "output_layer.weight" in names and "output_layer.weight" not in tensors:
        tensors = dict(tensors, **{"output_layer.weight": tensors["embedding.word_embeddings.weight"]})
    return tensors


def _mean_losses(reports):
    """Per-micro-batch mean LM loss from [loss sum, token count] reports (0 for a fully masked one)."""
    sums, tokens = torch.stack(reports).unbind(dim=1)
    return sums / tokens.clamp(min=1)


def _check(rank_results, references, cases):
    assert all(len(results) == len(cases) for results in rank_results), [len(results) for results in rank_results]
    for case_index, (case, reference) in enumerate(zip(cases, references, strict=True)):
        for rank, results in enumerate(rank_results):
            result = results[case_index]
            bad = {name: diff for name, diff in result["grad_diffs"].items() if diff > 1e-5}
            assert not bad, f"{case} rank {rank}: gradients differ from one process: {bad}"
            if result["last_stage"]:
                assert result["mtp_params"], f"{case} rank {rank}: last stage has no MTP parameters"
                torch.testing.assert_close(_mean_losses(result["losses"]), _mean_losses(reference["losses"]), atol=1e-5, rtol=0)
                torch.testing.assert_close(result["stats"], reference["stats"], atol=1e-4, rtol=0)
            else:
                assert not result["mtp_params"], f"{case} rank {rank}: MTP parameters off the last stage"
                assert result["losses"] == []


def _check_embedding_copies(rank_results, cases, tp):
    """PP=2 after optimizer steps: the last stage holds a copy of the word embedding where sequential MTP embeds
    its input or the output layer is tied; each copy equals the first stage's shard of the same TP rank."""
    for case_index, (mode, _, tied, _) in enumerate(cases):
        results = [r[case_index] for r in rank_results]
        firsts = {r["tp_rank"]: r for r in results if r["first_stage"] and not r["last_stage"]}
        lasts = {r["tp_rank"]: r for r in results if r["last_stage"] and not r["first_stage"]}
        stages = [(r["first_stage"], r["last_stage"], r["tp_rank"]) for r in results]
        assert len(results) == 2 * tp and sorted(firsts) == sorted(lasts) == list(range(tp)), (mode, tied, stages)
        for tp_rank in range(tp):
            first, last = firsts[tp_rank], lasts[tp_rank]
            assert "embedding" in first, (mode, tied, tp_rank)
            assert ("embedding" in last) == (mode == "sequential" or tied), (mode, tied, tp_rank)
            if "embedding" in last:
                torch.testing.assert_close(first["embedding"], last["embedding"], atol=0, rtol=0)


def _run(cases, world, tp, pp, optimizer_steps=0, vpp=None):
    references = _reference(cases, MICROBATCHES)
    rank_results = run_world(
        _parallel_run, world, cases, references, MICROBATCHES, optimizer_steps, tp=tp, pp=pp, vpp=vpp
    )
    assert len(rank_results) == world
    _check(rank_results, references, cases)
    if optimizer_steps:
        _check_embedding_copies(rank_results, cases, tp)


def test_tensor_parallel_with_and_without_sequence_parallel(single_process):
    _run(TP_CASES, world=2, tp=2, pp=1)


def test_pipeline_parallel_1f1b_and_embedding_copies_after_optimizer_steps(single_process):
    _run(PP_CASES, world=2, tp=1, pp=2, optimizer_steps=2)


def test_virtual_pipeline_interleaved_1f1b_and_layouts_and_embedding_copies(single_process):
    _run(VIRTUAL_PP_CASES, world=2, tp=1, pp=2, optimizer_steps=2, vpp=2)


def test_tensor_and_pipeline_parallel(single_process):
    _run(TP_PP_CASES, world=4, tp=2, pp=2, optimizer_steps=1)
