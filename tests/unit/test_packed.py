"""Packed (THD) micro-batches: MTP never reads or predicts across a document boundary, so a packed batch gives the
numbers of the same documents run as separate padded sequences (fp32, one process); sequential MTP also gives
Megatron-Core's own MTP numbers on a packed batch without padding."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

from megatron_mtp import cpu_bridge
from megatron_mtp.compat import megatron_core_mtp_logged_losses
from megatron_mtp.config import MTPConfig
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.loss import MTPStats
from megatron_mtp.model import MTPGPTModel
from packed_batches import documents, forward, packed_batch, separate_batch
from tiny import SEQ, VOCAB, transformer_config

DEPTHS = 2


def _models(mode: str, megatron_reference: bool = False):
    mtp = MTPConfig(num_layers=DEPTHS, mode=mode, loss_implementation="plain")
    config = transformer_config(mtp, num_layers=2)
    spec = cpu_bridge.with_packed_attention(get_gpt_layer_local_spec())
    ours = MTPGPTModel(
        config, spec, VOCAB, SEQ, mtp_config=mtp, mtp_block_spec=get_mtp_block_spec(spec, mtp),
        position_embedding_type="rope",
    )
    if not megatron_reference:
        return ours, None
    reference = GPTModel(
        config, spec, VOCAB, SEQ, position_embedding_type="rope",
        mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False),
    )
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def _run(model, batch, stats=None):
    """Mean LM loss over valid tokens, backward; returns it with a copy of every gradient."""
    model.zero_grad()
    per_token = forward(model, batch, **({} if stats is None else dict(mtp_stats=stats)))
    mask = batch["loss_mask"]
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


def _depth_losses(stats: MTPStats) -> torch.Tensor:
    summary = stats.summary()
    return torch.tensor([summary[f"mtp_{k}_loss"] for k in range(1, DEPTHS + 1)])


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_packed_batch_equals_separate_sequences(single_process, mode):
    model, _ = _models(mode)
    docs = documents()
    separate_stats, packed_stats = MTPStats(DEPTHS), MTPStats(DEPTHS)
    separate_loss, separate_grads = _run(model, separate_batch(docs), separate_stats)
    packed_loss, packed_grads = _run(model, packed_batch(docs), packed_stats)

    torch.testing.assert_close(packed_loss, separate_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_stats.values, separate_stats.values, atol=1e-5, rtol=0)
    # Depth 2 has n - 2 targets in an n-token document (none in the 2-token one), less the one masked label.
    assert packed_stats.summary()["mtp_2_tokens"] == sum(max(n - 2, 0) for n in [7, 2, 5, 7]) - 1
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_sequential_packed_batch_matches_megatron_core(single_process):
    """Megatron-Core rolls within each sequence of ``cu_seqlens_q``, as we do; it has no notion of padding there,
    so it is compared on the batch without padding."""
    ours, reference = _models("sequential", megatron_reference=True)
    batch = packed_batch(documents(), padded=False)

    MTPLossLoggingHelper.tracker.clear()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    reference_loss, reference_grads = _run(reference, batch)
    reference_depth_losses = megatron_core_mtp_logged_losses()
    MTPLossLoggingHelper.tracker.clear()
    stats = MTPStats(DEPTHS)
    our_loss, our_grads = _run(ours, batch, stats)

    torch.testing.assert_close(our_loss, reference_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(_depth_losses(stats), reference_depth_losses, atol=1e-5, rtol=0)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=0, msg=name)


def test_packed_inputs_fail_clearly(single_process):
    model, _ = _models("sequential")
    batch = packed_batch(documents())
    two_rows = {**batch, **{key: batch[key].expand(2, -1) for key in ("tokens", "labels", "loss_mask", "position_ids")}}
    with pytest.raises(ValueError, match="micro-batch size 1"):
        forward(model, two_rows)
    params = batch["packed_seq_params"]
    params.cu_seqlens_q_padded = params.cu_seqlens_q_padded.clone()
    params.cu_seqlens_q_padded[2] -= 1  # the 2-token document would get one slot
    with pytest.raises(ValueError, match="at least its own length"):
        forward(model, batch)
