"""Sequential MTP gives Megatron-Core's own MTP numbers for the same weights (copied across by name)."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

from megatron_mtp.compat import megatron_core_mtp_logged_losses
from megatron_mtp.config import MTPConfig
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.loss import MTPStats
from megatron_mtp.model import MTPGPTModel
from tiny import SEQ, VOCAB, make_batches, transformer_config


@pytest.mark.parametrize("depths", [1, 2])
@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_sequential_mode_matches_megatron_core(single_process, depths, position):
    mtp = MTPConfig(num_layers=depths)
    config = transformer_config(mtp, num_layers=2)
    spec = get_gpt_layer_local_spec()
    reference = GPTModel(
        config, spec, VOCAB, SEQ, position_embedding_type=position,
        mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False),
    )
    ours = MTPGPTModel(
        config, spec, VOCAB, SEQ, mtp_config=mtp, mtp_block_spec=get_mtp_block_spec(spec, mtp),
        position_embedding_type=position,
    )
    ours.load_state_dict(reference.state_dict(), strict=True)

    batch = make_batches(1, seed=3)[0]
    inputs = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    mask = batch["loss_mask"]

    MTPLossLoggingHelper.tracker.clear()
    # Megatron-Core's MTP backward scale is class state left by whichever schedule ran last; a direct
    # backward of the mean loss needs 1.
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    reference_loss = reference(*inputs, labels=batch["labels"], loss_mask=mask)
    ((reference_loss * mask).sum() / mask.sum()).backward()
    reference_depth_losses = megatron_core_mtp_logged_losses()
    MTPLossLoggingHelper.tracker.clear()

    stats = MTPStats(depths)
    our_loss = ours(*inputs, labels=batch["labels"], loss_mask=mask, mtp_stats=stats)
    ((our_loss * mask).sum() / mask.sum()).backward()

    torch.testing.assert_close(our_loss, reference_loss, atol=1e-5, rtol=0)
    summary = stats.summary()
    our_depth_losses = torch.tensor([summary[f"mtp_{k}_loss"] for k in range(1, depths + 1)])
    torch.testing.assert_close(our_depth_losses, reference_depth_losses, atol=1e-5, rtol=0)
    reference_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, reference_grads[name].grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("per_token_loss", [False, True])
def test_schedule_loss_scaling_matches_megatron_core(single_process, per_token_loss):
    """Through Megatron's schedule with 3 micro-batches, Megatron-Core scales its MTP loss with a global set by
    the schedule; ours takes the scale from the main loss's gradient. The gradients must agree."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mtp = MTPConfig(num_layers=2)
    config = transformer_config(mtp, num_layers=2, calculate_per_token_loss=per_token_loss)
    spec = get_gpt_layer_local_spec()
    reference = GPTModel(
        config, spec, VOCAB, SEQ, position_embedding_type="rope",
        mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False),
    )
    ours = MTPGPTModel(
        config, spec, VOCAB, SEQ, mtp_config=mtp, mtp_block_spec=get_mtp_block_spec(spec, mtp),
        position_embedding_type="rope",
    )
    ours.load_state_dict(reference.state_dict(), strict=True)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                       labels=batch["labels"], loss_mask=batch["loss_mask"])

        def loss_func(per_token):
            mask = batch["loss_mask"]
            return (per_token * mask).sum(), mask.sum().to(torch.int), {}

        return output, loss_func

    for model in (reference, ours):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(make_batches(3, seed=5)), model=[model],
            num_microbatches=3, seq_length=SEQ, micro_batch_size=2, forward_only=False,
        )
    reference_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, reference_grads[name].grad, atol=1e-5, rtol=1e-5, msg=name)
