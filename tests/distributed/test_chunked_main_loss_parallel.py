"""TP=2 with SP and PP=2 (1F1B, 3 micro-batches, one fully masked) under Megatron DDP, fp32: the chunked main loss
gives the per-micro-batch losses and every parameter's gradient on every rank of the plain main loss, without MTP
and in both modes, tied and untied, with the logits recomputed in backward and kept from forward; one spawned
world runs all cases of a topology."""

import torch

from megatron_mtp.config import MTPConfig
from mp_world import run_world
from tiny import build_model_with_weights, global_names, grad_of, make_batches, train_step, transformer_config, wrap_ddp

PP_CASES = [(0, "sequential", False), (2, "sequential", True), (2, "parallel", False)]  # (num_layers, mode, tied)
TP_CASES = [(0, "sequential", True), (2, "sequential", False), (2, "parallel", True)]


MAIN_LOSSES = {  # MTPConfig settings of the main loss; fp32, so "chunked" recomputes the logits by default
    "plain": dict(main_loss_implementation="plain"),
    "chunked": dict(main_loss_implementation="chunked"),
    "chunked, logits kept": dict(main_loss_implementation="chunked", main_loss_recompute_logits=False),
}


def _chunked_minus_plain(cases, tp, pp):
    """Per case and chunked main loss, this rank's max |chunked - plain| of the per-token LM losses (None off the
    last stage) and of each parameter's gradient."""
    results = []
    for num_layers, mode, tied in cases:
        weights, losses, grads = None, {}, {}
        for main, settings in MAIN_LOSSES.items():
            mtp = MTPConfig(num_layers=num_layers, mode=mode, loss_chunk_size=5, **settings)
            config = transformer_config(mtp, tp=tp, pp=pp, sp=tp > 1)
            model, weights = build_model_with_weights(config, mtp, tied, weights)
            model = wrap_ddp(model, config)
            reports = train_step(model, config, make_batches(3, fully_masked_microbatch=1))
            losses[main] = _mean_losses(reports)
            grads[main] = {name: grad_of(param).clone() for name, param in global_names(model).items()}
        differences = {}
        for main in MAIN_LOSSES.keys() - {"plain"}:
            loss_diff = None if losses["plain"] is None else (losses[main] - losses["plain"]).abs().max().item()
            grad_diffs = {name: (grads[main][name] - grad).abs().max().item() for name, grad in grads["plain"].items()}
            differences[main] = (loss_diff, grad_diffs)
        results.append(differences)
    return results


def _mean_losses(reports):
    """Per micro-batch [LM loss per token, tokens] from train_step's [loss sum, tokens] (None off the last stage)."""
    if not reports:
        return None
    sums, tokens = torch.stack(reports).unbind(-1)
    return torch.stack((sums / tokens.clamp(min=1), tokens), dim=-1)


def _check(per_rank, cases):
    last_stage_losses = 0
    for rank, results in enumerate(per_rank):
        for case, differences in zip(cases, results, strict=True):
            assert differences.keys() == MAIN_LOSSES.keys() - {"plain"}
            for main, (loss_diff, grad_diffs) in differences.items():
                where = f"rank {rank}, (num_layers, mode, tied) = {case}, {main}"
                assert loss_diff is None or loss_diff <= 1e-5, f"{where}: losses differ by {loss_diff}"
                last_stage_losses += loss_diff is not None
                too_far = {name: diff for name, diff in grad_diffs.items() if not diff <= 1e-5}
                assert not too_far, f"{where}: {too_far}"
    assert last_stage_losses >= 2 * len(cases)  # the losses were compared


def test_chunked_main_loss_equals_the_plain_one_at_pp2():
    _check(run_world(_chunked_minus_plain, 2, PP_CASES, 1, 2, pp=2), PP_CASES)


def test_chunked_main_loss_equals_the_plain_one_at_tp2_with_sequence_parallelism():
    _check(run_world(_chunked_minus_plain, 2, TP_CASES, 2, 1, tp=2), TP_CASES)
