"""MoE auxiliary losses on: load balancing (``aux_loss`` or ``seq_aux_loss``) and the router z-loss, in a 4-layer
MoE decoder with two MoE MTP layers, both MTP modes, in one process, at PP=2 (1F1B) and at EP=2.

- The MTP layers' transformer layers get the layer numbers Megatron-Core's own MTP layers get for the same
  config (``GPTModel`` with ``get_gpt_mtp_block_spec``), on every pipeline stage. A sequential depth's router
  logs its aux losses into the slot Megatron-Core's MTP router uses (``num_layers + depth``); a parallel head's
  router logs nothing (no slot: ``mtp_num_layers`` stays unset for parallel heads) and still trains its head.
- At PP=2 and EP=2, losses, every gradient and the per-layer aux-loss log equal one process's.
"""

import pytest
import torch

from megatron.core import parallel_state

from megatron_mtp.compat import MTP_INNER_LAYER, moe_aux_loss_values, reset_moe_aux_loss_log
from megatron_mtp.config import MTPConfig
from mp_world import run_world
from tiny import (
    BATCH,
    HIDDEN,
    SEQ,
    build_megatron_core_model,
    build_model,
    global_names,
    grad_of,
    load_full_state,
    make_batches,
    max_grad_diffs,
    train_step,
    transformer_config,
    wrap_ddp,
)

NUM_LAYERS = 4
DEPTHS = 2
MICROBATCHES = 3
BALANCING_LOG_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}
# (MTP mode, moe_router_load_balancing_type)
CASES = [
    ("sequential", "aux_loss"),
    ("sequential", "seq_aux_loss"),
    ("parallel", "aux_loss"),
    ("parallel", "seq_aux_loss"),
]
EP_CASES = [("sequential", "seq_aux_loss"), ("parallel", "aux_loss")]


def _mtp_config(mode: str) -> MTPConfig:
    return MTPConfig(num_layers=DEPTHS, mode=mode)


def _config(mtp: MTPConfig, balancing: str, pp: int = 1, ep: int = 1, aux_coeff: float = 1e-2, z_coeff=1e-3):
    return transformer_config(
        mtp,
        pp=pp,
        ep=ep,
        num_layers=NUM_LAYERS,
        num_experts=4,
        moe_aux_loss_coeff=aux_coeff,
        moe_z_loss_coeff=z_coeff,
        moe_router_load_balancing_type=balancing,
    )


def _mtp_layer_numbering(model) -> list:
    """Per MTP layer on this stage: (transformer layer's layer_number, router's layer_number, {log name: slots
    a training-mode router call logs into}). Resets Megatron-Core's aux-loss log."""
    core = model.module if hasattr(model, "module") else model
    numbering = []
    for layer in core.mtp.layers if hasattr(core, "mtp") else ():
        inner = getattr(layer, MTP_INNER_LAYER)
        reset_moe_aux_loss_log()
        inner.mlp.router(torch.randn(SEQ, BATCH, HIDDEN))
        slots = {name: values.nonzero().flatten().tolist() for name, values in moe_aux_loss_values().items()}
        numbering.append((inner.layer_number, inner.mlp.router.layer_number, slots))
    reset_moe_aux_loss_log()
    return numbering


def _megatron_core_numbering(balancing: str, pp: int = 1, ep: int = 1) -> list:
    """Megatron-Core's own MTP layers (same config, ``mtp_num_layers`` = depths) on this stage."""
    config = _config(_mtp_config("sequential"), balancing, pp=pp, ep=ep)
    return _mtp_layer_numbering(build_megatron_core_model(config))


def _check_numbering(case, ours, megatron_core, last_stage: bool):
    mode, balancing = case
    assert len(ours) == len(megatron_core) == (DEPTHS if last_stage else 0), (case, ours, megatron_core)
    for depth, ((layer, router, slots), (core_layer, core_router, core_slots)) in enumerate(
        zip(ours, megatron_core), start=1
    ):
        assert layer == core_layer, f"{case} depth {depth}: layer number {layer}, Megatron-Core's {core_layer}"
        slot = [NUM_LAYERS + depth - 1]
        assert core_slots == {BALANCING_LOG_NAMES[balancing]: slot, "z_loss": slot}, (case, depth, core_slots)
        if mode == "sequential":
            assert (router, slots) == (core_router, core_slots), (case, depth, router, slots, core_router, core_slots)
        else:
            assert (router, slots) == (None, {}), f"{case} depth {depth}: a parallel head's router has no slot"


def _reference(cases):
    """One process: initial weights, per-micro-batch LM loss, gradients and the aux-loss log of a step."""
    results = []
    for mode, balancing in cases:
        mtp = _mtp_config(mode)
        config = _config(mtp, balancing)
        model = wrap_ddp(build_model(config, mtp), config)
        weights = {name: p.detach().clone() for name, p in global_names(model).items()}
        reset_moe_aux_loss_log()
        losses = train_step(model, config, make_batches(MICROBATCHES))
        log = {name: values.clone() for name, values in moe_aux_loss_values().items()}
        grads = {name: grad_of(p).clone() for name, p in global_names(model).items()}
        results.append(dict(weights=weights, losses=losses, grads=grads, log=log))
    return results


def _parallel_run(cases, references):
    """Each rank: this world's PP/EP, the reference weights and data; returns what the test compares."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    out = []
    for (mode, balancing), reference in zip(cases, references):
        mtp = _mtp_config(mode)
        config = _config(mtp, balancing, pp=pp, ep=ep)
        model = build_model(config, mtp)
        numbering = _mtp_layer_numbering(model)
        load_full_state(model, reference["weights"])
        model = wrap_ddp(model, config)
        reset_moe_aux_loss_log()
        losses = train_step(model, config, make_batches(MICROBATCHES))
        log = {name: values.clone() for name, values in moe_aux_loss_values().items()}
        out.append(
            dict(
                last_stage=parallel_state.is_pipeline_last_stage(),
                numbering=numbering,
                megatron_core_numbering=_megatron_core_numbering(balancing, pp, ep),
                losses=losses,
                log=log,
                grad_diffs=max_grad_diffs(model, reference["grads"]),
            )
        )
    return out


def _check_against_reference(case, reference, rank_results, sum_logs_over_ranks: bool):
    for rank, result in enumerate(rank_results):
        bad = {name: diff for name, diff in result["grad_diffs"].items() if diff > 1e-5}
        assert not bad, f"{case} rank {rank}: gradients differ from one process: {bad}"
        if result["last_stage"]:
            losses, reference_losses = torch.stack(result["losses"]), torch.stack(reference["losses"])
            torch.testing.assert_close(losses, reference_losses, atol=1e-5, rtol=0)
        _check_numbering(case, result["numbering"], result["megatron_core_numbering"], result["last_stage"])
    logs = [result["log"] for result in rank_results]
    assert all(set(log) == set(reference["log"]) for log in logs), (case, [set(log) for log in logs])
    for name, values in reference["log"].items():
        assert values.numel() == NUM_LAYERS + (DEPTHS if case[0] == "sequential" else 0), (case, name)
        assert (values > 0).all(), f"{case}: {name} not logged for every layer: {values}"
        if sum_logs_over_ranks:  # pipeline stages log their own layers; Megatron-Core sums them
            torch.testing.assert_close(sum(log[name] for log in logs), values, atol=1e-5, rtol=0, msg=f"{case} {name}")
        else:
            for log in logs:
                torch.testing.assert_close(log[name], values, atol=1e-5, rtol=0, msg=f"{case} {name}")


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_one_process_mtp_layers_take_megatron_core_slots(single_process, case):
    mode, balancing = case
    mtp = _mtp_config(mode)
    config = _config(mtp, balancing)
    model = build_model(config, mtp)
    _check_numbering(case, _mtp_layer_numbering(model), _megatron_core_numbering(balancing), last_stage=True)

    model = wrap_ddp(model, config)
    reset_moe_aux_loss_log()
    train_step(model, config, make_batches(MICROBATCHES))
    log = moe_aux_loss_values()
    assert set(log) == {BALANCING_LOG_NAMES[balancing], "z_loss"}
    for name, values in log.items():
        assert values.numel() == NUM_LAYERS + (DEPTHS if mode == "sequential" else 0), (name, values)
        assert (values > 0).all(), f"{name} not logged for every layer: {values}"
    reset_moe_aux_loss_log()
    if mode == "parallel":
        _check_head_routers_train_on_aux_losses(model, mtp, balancing)


def _check_head_routers_train_on_aux_losses(model, mtp, balancing):
    """Untracked, a head's router still gets its aux losses' gradient: it differs with the coefficients at 0."""
    names = global_names(model)
    routers = {name: grad_of(p).clone() for name, p in names.items() if name.startswith("mtp.") and "router" in name}
    assert routers
    weights = {name: p.detach().clone() for name, p in names.items()}
    config = _config(mtp, balancing, aux_coeff=0.0, z_coeff=None)
    plain = build_model(config, mtp)
    load_full_state(plain, weights)
    plain = wrap_ddp(plain, config)
    train_step(plain, config, make_batches(MICROBATCHES))
    plain_grads = global_names(plain)
    for name, grad in routers.items():
        assert (grad - grad_of(plain_grads[name])).abs().max() > 1e-6, f"{name}: aux losses do not reach it"


def test_pipeline_parallel_2(single_process):
    references = _reference(CASES)
    rank_results = run_world(_parallel_run, 2, CASES, references, pp=2)
    for index, case in enumerate(CASES):
        _check_against_reference(case, references[index], [r[index] for r in rank_results], sum_logs_over_ranks=True)


def test_expert_parallel_2(single_process):
    """Both ranks also form a data-parallel pair for the dense weights, on the same data."""
    references = _reference(EP_CASES)
    rank_results = run_world(_parallel_run, 2, EP_CASES, references, ep=2)
    for index, case in enumerate(EP_CASES):
        _check_against_reference(case, references[index], [r[index] for r in rank_results], sum_logs_over_ranks=False)
