"""A packed (THD) micro-batch at TP=2 with sequence parallelism gives one process's LM loss, per-depth MTP counts and
every gradient (fp32, Megatron DDP and schedule), both MTP modes in one spawned world."""

from typing import Optional

import torch

from megatron.core import parallel_state

from megatron_mtp import cpu_bridge
from megatron_mtp.config import MTPConfig
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.loss import MTPStats
from megatron_mtp.model import MTPGPTModel
from mp_world import run_world
from packed_batches import documents, packed_batch, train_step
from tiny import (
    SEQ, VOCAB, decoder_spec, global_names, grad_of, load_full_state, max_grad_diffs, transformer_config, wrap_ddp,
)

MODES = ["sequential", "parallel"]


def _model(mode: str, tp: int):
    mtp = MTPConfig(num_layers=2, mode=mode)
    config = transformer_config(mtp, tp=tp, sp=tp > 1, num_layers=2)
    spec = cpu_bridge.with_packed_attention(decoder_spec(config))
    mtp_spec = cpu_bridge.with_sequence_parallel_norms(get_mtp_block_spec(spec, mtp))
    model = MTPGPTModel(
        config, spec, VOCAB, SEQ, mtp_config=mtp, mtp_block_spec=mtp_spec, position_embedding_type="rope"
    )
    return model, config


def _run_mode(mode: str, reference: Optional[dict] = None) -> dict:
    """This rank's loss, MTP counts and gradients (reference: None) or gradient differences from ``reference``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model, config = _model(mode, tp)
    if reference is not None:
        load_full_state(model, reference["weights"])
    model = wrap_ddp(model, config)
    weights = {name: param.detach().clone() for name, param in global_names(model).items()}
    stats = MTPStats(2)
    loss = train_step(model, packed_batch(documents()), mtp_stats=stats)
    result = dict(loss=loss, stats=stats.values)
    if reference is None:
        grads = {name: grad_of(param).clone() for name, param in global_names(model).items()}
        return dict(result, weights=weights, grads=grads)
    return dict(result, grad_diffs=max_grad_diffs(model, reference["grads"]))


def _parallel_runs(references):
    return [_run_mode(mode, reference) for mode, reference in zip(MODES, references, strict=True)]


def test_packed_batch_at_tp2_with_sequence_parallelism_equals_one_process(single_process):
    references = [_run_mode(mode) for mode in MODES]
    for rank, results in enumerate(run_world(_parallel_runs, 2, references, tp=2)):
        for mode, result, reference in zip(MODES, results, references, strict=True):
            torch.testing.assert_close(result["loss"], reference["loss"], atol=1e-5, rtol=0)
            torch.testing.assert_close(result["stats"], reference["stats"], atol=1e-5, rtol=0)
            bad = {name: diff for name, diff in result["grad_diffs"].items() if not diff <= 1e-5}
            assert not bad, f"{mode}, rank {rank}: gradients differ from one process: {bad}"
