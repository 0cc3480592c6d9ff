"""MTPGPTModel behaviour in one process: gradients, head independence, lambda/weights/schedule in the model,
inference output, and clear errors for bad inputs."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_mtp.config import MTPConfig
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.loss import MTPStats
from megatron_mtp.loss.mtp_loss import OutputHead, plain_depth_loss
from megatron_mtp.layers import roll_left
from megatron_mtp.model import MTPGPTModel
from tiny import SEQ, VOCAB, build_model, decoder_spec, make_batches, transformer_config


def _model(mtp, **kwargs):
    torch.manual_seed(7)
    return build_model(transformer_config(mtp, num_layers=2), mtp, **kwargs)


def _loss(model, batch, **kwargs):
    out = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"],
        labels=batch["labels"], loss_mask=batch["loss_mask"], **kwargs,
    )
    return (out * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def _mtp_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("mtp.")}


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_every_mtp_parameter_gets_a_gradient(single_process, mode):
    model = _model(MTPConfig(num_layers=2, mode=mode))
    _loss(model, make_batches(1)[0]).backward()
    grads = _mtp_grads(model)
    assert len(grads) > 10
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_parallel_heads_get_independent_gradients(single_process):
    mtp = MTPConfig(num_layers=2, mode="parallel")
    model = _model(mtp)
    batch = make_batches(1)[0]
    decoder_out = model.decoder(
        hidden_states=model.embedding(input_ids=batch["tokens"], position_ids=batch["position_ids"]),
        attention_mask=batch["attention_mask"],
        rotary_pos_emb=model.rotary_pos_emb(SEQ),
    )
    heads = model.mtp(decoder_out, batch["attention_mask"], rotary_pos_emb=model.rotary_pos_emb(SEQ))
    head = OutputHead(model.output_layer, None, model.compute_language_model_loss)
    for depth, states in enumerate(heads, start=1):
        loss = plain_depth_loss(
            states, head, roll_left(batch["labels"], depth), roll_left(batch["loss_mask"], depth), False
        ).loss_sum
        for other, layer in enumerate(model.mtp.layers, start=1):
            grads = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True, allow_unused=True)
            moved = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
            assert (moved > 0) == (other == depth), f"loss of head {depth} moved head {other}: {moved}"


def test_lambda_and_depth_weights_scale_head_gradients(single_process):
    batch = make_batches(1)[0]
    grads = {}
    for name, kwargs in {
        "uniform_0.1": dict(loss_scaling_factor=0.1),
        "uniform_0.3": dict(loss_scaling_factor=0.3),
        "harmonic_0.1": dict(loss_scaling_factor=0.1, depth_weighting="harmonic"),
    }.items():
        model = _model(MTPConfig(num_layers=2, mode="parallel", **kwargs))
        _loss(model, batch).backward()
        grads[name] = _mtp_grads(model)
    for param, grad in grads["uniform_0.1"].items():
        torch.testing.assert_close(grads["uniform_0.3"][param], 3 * grad, rtol=1e-5, atol=1e-9)
        # head k's share is w_k / sum(w): uniform 1/2 each, harmonic (1, 1/2) / 1.5 -> 4/3 and 2/3 of uniform
        ratio = 4 / 3 if param.startswith("mtp.layers.0.") else 2 / 3
        torch.testing.assert_close(grads["harmonic_0.1"][param], ratio * grad, rtol=1e-5, atol=1e-9)


def test_lambda_schedule_follows_mtp_step(single_process):
    batch = make_batches(1)[0]
    scheduled = _model(MTPConfig(num_layers=1, loss_scaling_factor=0.3, loss_scaling_schedule=((10, 0.1),)))
    with pytest.raises(ValueError, match="pass mtp_step"):
        _loss(scheduled, batch)
    _loss(scheduled, batch, mtp_step=12).backward()
    plain = _model(MTPConfig(num_layers=1, loss_scaling_factor=0.1))
    _loss(plain, batch).backward()
    for name, grad in _mtp_grads(plain).items():
        torch.testing.assert_close(dict(scheduled.named_parameters())[name].grad, grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_inference_returns_main_logits_only(single_process, mode):
    mtp = MTPConfig(num_layers=2, mode=mode)
    model = _model(mtp).eval()
    config = transformer_config(MTPConfig(num_layers=0), num_layers=2)
    plain = GPTModel(config, decoder_spec(config), VOCAB, SEQ, position_embedding_type="rope").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}, strict=True)
    batch = make_batches(1)[0]
    inputs = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    with torch.no_grad():
        logits = model(*inputs)
        assert logits.shape == (batch["tokens"].shape[0], SEQ, VOCAB)
        torch.testing.assert_close(logits, plain(*inputs), atol=0, rtol=0)
        stats = MTPStats(2)
        model(*inputs, labels=batch["labels"], loss_mask=batch["loss_mask"], mtp_stats=stats)
        assert stats.values is None, "MTP ran in eval without being asked"
        model(*inputs, labels=batch["labels"], loss_mask=batch["loss_mask"], mtp_stats=stats, compute_mtp=True)
        assert stats.values is not None and stats.values[:, 1].min() > 0


def test_fully_masked_micro_batch_gives_finite_zero_mtp_gradients(single_process):
    model = _model(MTPConfig(num_layers=2))
    batch = make_batches(1, fully_masked_microbatch=0)[0]
    stats = MTPStats(2)
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                labels=batch["labels"], loss_mask=batch["loss_mask"], mtp_stats=stats)
    (out * batch["loss_mask"]).sum().backward()
    assert stats.values[:, 1].sum() == 0 and not torch.isnan(stats.values).any()
    for name, grad in _mtp_grads(model).items():
        assert torch.isfinite(grad).all() and grad.abs().sum() == 0, name


def test_bad_inputs_fail_clearly(single_process):
    mtp = MTPConfig(num_layers=2)
    model = _model(mtp)
    batch = make_batches(1)[0]
    inputs = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match=r"labels shape \(2, 15\) must equal input_ids shape \(2, 16\)"):
        model(*inputs, labels=batch["labels"][:, :-1], loss_mask=batch["loss_mask"][:, :-1])
    # Without a loss mask MTP would train on padding through the rolled targets: refused, naming the argument.
    with pytest.raises(ValueError, match="labels without loss_mask"):
        model(*inputs, labels=batch["labels"])
    config = transformer_config(mtp, num_layers=2)
    spec = get_gpt_layer_local_spec()
    with pytest.raises(ValueError, match="cannot roll position ids of position_embedding_type='mrope'"):
        MTPGPTModel(config, spec, VOCAB, SEQ, mtp, get_mtp_block_spec(spec, mtp), position_embedding_type="mrope")
    with pytest.raises(ValueError, match=r"must be smaller than the sequence length \(2\)"):
        MTPGPTModel(config, spec, VOCAB, 2, mtp, get_mtp_block_spec(spec, mtp))
    with pytest.raises(ValueError, match="mtp_block_spec is required"):
        MTPGPTModel(config, spec, VOCAB, SEQ, mtp)
    standalone = transformer_config(mtp, num_layers=3, pp=2, pipeline_model_parallel_layout="Et|t|tmm|L")
    with pytest.raises(NotImplementedError, match=r"\(--pipeline-model-parallel-layout\): the MTP layers \('m'\) are on "
                       r"pipeline rank 0, virtual stage 1, without the loss \('L'\)"):
        MTPGPTModel(standalone, spec, VOCAB, SEQ, mtp, get_mtp_block_spec(spec, mtp))
    parallel = MTPConfig(num_layers=2, mode="parallel")
    with pytest.raises(ValueError, match="TransformerConfig.mtp_num_layers is 2 but .* needs None"):
        MTPGPTModel(config, spec, VOCAB, SEQ, parallel, get_mtp_block_spec(spec, parallel))
