"""bf16 as Megatron-LM trains (bf16 parameters under ``Float16Module``, fp32 ``main_grad`` from Megatron-Core's
DDP, fp32 main parameters in Megatron-Core's optimizer), one process: both MTP modes train, the chunked MTP loss
agrees with the plain one, and bf16 agrees with an fp32 reference started from the same (bf16-representable)
weights. The distributed optimizer at DP=2: tests/distributed/test_distributed_optimizer_bf16.py.

Tolerances. bf16 keeps 8 significant bits: one rounding changes a value by up to u = 2^-8 (0.39%) of itself.
- Losses: the cross-entropy runs in fp32 on bf16 logits in both loss paths, so chunked and plain see the same
  logits and their losses differ only by fp32 summation order: 1e-5 relative (7e-8 seen). Against fp32 the
  logits themselves are rounded; the loss, an average over tokens, moves far less than u: 2e-3 relative
  (2.2e-4 seen).
- Gradients: every bf16 matmul and activation in backward rounds again, so a gradient carries a few
  independent roundings of size u. Compared per parameter as ||g - g_ref|| / ||g_ref||, bounded by 2.5e-2,
  about 6u (bf16 vs fp32: up to 1.2% seen). The chunked path rounds in other places than the plain one, so it
  differs from plain bf16 at that level, not more: the same bound (1.1% seen with gradients kept from forward,
  which rounds dL/dh to bf16 before the incoming gradient scale is applied; 0.25% when recomputing, where dL/dh
  equals plain's bit for bit and only the output weight's fp32-summed gradient differs). The MTP loss is
  weighted 1 here, so a lost or misplaced MTP gradient cannot hide inside the bound: scaling the chunked
  output-weight gradient by 0.8 gives a 12% error.
"""

import pytest
import torch

from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from tiny import adam, build_model, global_names, make_batches, train_step, transformer_config, wrap_ddp

CASES = [("sequential", False), ("sequential", True), ("parallel", False)]  # (mode, tied output layer)
LOSS_RTOL_VS_FP32 = 2e-3
LOSS_RTOL_CHUNKED = 1e-5
GRAD_RTOL = 2.5e-2


def _mtp_config(mode: str, tied: bool, implementation: str = "plain", recompute: bool = False) -> MTPConfig:
    latent = 0.3 if tied else 0.0  # the tied case also runs the latent losses in bf16
    return MTPConfig(
        num_layers=2,
        mode=mode,
        loss_scaling_factor=1.0,
        loss_implementation=implementation,
        loss_chunk_size=7,
        loss_recompute_logits=recompute,
        latent_consistency_weight=latent,
        semantic_anchoring_weight=latent / 2,
    )


_WEIGHTS = {}


def _weights(mode: str, tied: bool):
    """Initial weights for a case, rounded to bf16 so that the fp32 and bf16 runs start from the same values."""
    if (mode, tied) not in _WEIGHTS:
        torch.manual_seed(0)
        mtp = _mtp_config(mode, tied)
        model = build_model(transformer_config(mtp), mtp, tied=tied)
        _WEIGHTS[mode, tied] = {
            name: tensor.to(torch.bfloat16).float() if tensor.is_floating_point() else tensor
            for name, tensor in model.state_dict().items()
            if torch.is_tensor(tensor)
        }
    return _WEIGHTS[mode, tied]


def _model(mtp: MTPConfig, tied: bool, bf16: bool):
    config = transformer_config(mtp, bf16=bf16)
    model = build_model(config, mtp, tied=tied)
    weights = _weights(mtp.mode, tied)
    model.load_state_dict({name: weights[name].to(value.dtype) if name in weights else value
                           for name, value in model.state_dict().items()})
    return wrap_ddp(model, config), config


def _one_backward(mtp: MTPConfig, tied: bool, bf16: bool):
    """LM loss reports [micro-batches, 2], MTP counts [D, 6] and the fp32 main_grad of every parameter."""
    model, config = _model(mtp, tied, bf16)
    stats = MTPStats(mtp.num_layers, mtp.latent_losses)
    losses = train_step(model, config, make_batches(3, fully_masked_microbatch=1), stats)
    params = global_names(model)
    assert all(p.dtype == (torch.bfloat16 if bf16 else torch.float32) for p in params.values())
    assert all(p.main_grad.dtype == torch.float32 for p in params.values())
    return torch.stack(losses), stats.values, {name: p.main_grad.clone() for name, p in params.items()}


def _assert_grads_close(grads, reference, what: str):
    assert any(name.startswith("mtp.") and g.abs().sum() > 0 for name, g in reference.items())
    errors = {
        name: ((grads[name] - g).norm() / g.norm()).item() for name, g in reference.items() if g.abs().sum() > 0
    }
    bad = {name: error for name, error in errors.items() if not error <= GRAD_RTOL}
    assert not bad, f"{what}: main_grad relative error above {GRAD_RTOL}: {bad}"


@pytest.mark.parametrize("mode,tied", CASES)
def test_bf16_chunked_loss_agrees_with_plain(single_process, mode, tied):
    plain_losses, plain_stats, plain_grads = _one_backward(_mtp_config(mode, tied), tied, bf16=True)
    for recompute in (False, True):
        losses, stats, grads = _one_backward(_mtp_config(mode, tied, "chunked", recompute), tied, bf16=True)
        torch.testing.assert_close(losses, plain_losses, rtol=LOSS_RTOL_CHUNKED, atol=0)
        torch.testing.assert_close(stats[:, 1:4], plain_stats[:, 1:4], rtol=0, atol=0)  # tokens, top-1 hits
        torch.testing.assert_close(stats, plain_stats, rtol=LOSS_RTOL_CHUNKED, atol=1e-6)
        _assert_grads_close(grads, plain_grads, f"chunked (recompute={recompute}) vs plain, bf16")


@pytest.mark.parametrize("mode,tied", CASES)
def test_bf16_agrees_with_fp32_reference(single_process, mode, tied):
    ref_losses, ref_stats, ref_grads = _one_backward(_mtp_config(mode, tied), tied, bf16=False)
    losses, stats, grads = _one_backward(_mtp_config(mode, tied, "chunked"), tied, bf16=True)
    torch.testing.assert_close(losses, ref_losses, rtol=LOSS_RTOL_VS_FP32, atol=0)
    assert stats[:, 1].equal(ref_stats[:, 1])  # same valid-token counts
    loss_columns = [0, 4, 5] if tied else [0]  # CE sums, and the latent MSE sums where enabled
    torch.testing.assert_close(stats[:, loss_columns], ref_stats[:, loss_columns], rtol=LOSS_RTOL_VS_FP32, atol=0)
    _assert_grads_close(grads, ref_grads, "bf16 (chunked) vs fp32 (plain)")


@pytest.mark.parametrize("mode,tied", CASES)
def test_bf16_training_lowers_the_loss(single_process, mode, tied):
    """Six steps of Megatron-Core's bf16 Adam (fp32 main parameters) on one fixed batch: the LM loss and every
    depth's MTP loss fall well below their first-step values, and nothing becomes NaN."""
    mtp = _mtp_config(mode, tied, "chunked")
    model, config = _model(mtp, tied, bf16=True)
    optimizer = adam(model, config, lr=3e-3)
    batches = make_batches(2)
    per_step = []
    for _ in range(6):
        optimizer.zero_grad()
        stats = MTPStats(mtp.num_layers)
        reports = torch.stack(train_step(model, config, batches, stats)).sum(dim=0)
        succeeded, grad_norm, _ = optimizer.step()
        assert succeeded and torch.isfinite(torch.tensor(grad_norm))
        summary = stats.summary()
        per_step.append([(reports[0] / reports[1]).item()] + [summary[f"mtp_{k}_loss"] for k in (1, 2)])
    first, last = torch.tensor(per_step[0]), torch.tensor(per_step[-1])
    assert torch.isfinite(torch.tensor(per_step)).all()
    assert (last < 0.95 * first).all(), f"losses [lm, mtp_1, mtp_2] per step: {per_step}"
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize(
    "flags, params_dtype, main_grad_dtype",
    [
        ([], torch.float32, torch.float32),  # Megatron-LM's default
        (["--bf16"], torch.bfloat16, torch.float32),
        (["--bf16", "--accumulate-allreduce-grads-in-fp32"], torch.bfloat16, torch.float32),
        (["--bf16", "--grad-reduce-in-bf16"], torch.bfloat16, torch.bfloat16),
    ],
)
def test_pretrain_precision_flags_build_megatron_lms_model(single_process, flags, params_dtype, main_grad_dtype):
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params
    from megatron.core.transformer.module import Float16Module

    from megatron_mtp.training.arguments import parse_args
    from megatron_mtp.training.setup import Runtime, build_model, build_optimizer, precision
    from megatron_mtp.training.setup import transformer_config as run_config

    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                       "--micro-batch-size", "8", "--train-iters", "10", "--lr", "1e-3", "--tokenizer-type", "ByteLevel",
                       *flags])
    runtime = Runtime("cpu", *precision(args), 1, 1, 8)
    config = run_config(args, runtime)
    chunks = build_model(args, runtime, config, 256)
    optimizer, _ = build_optimizer(args, runtime, chunks)
    (model,) = chunks
    bf16 = params_dtype == torch.bfloat16
    assert (config.bf16, config.params_dtype, config.pipeline_dtype) == (bf16, params_dtype, params_dtype)
    assert isinstance(model.module, Float16Module) == bf16
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    assert all(isinstance(part, Float16OptimizerWithFloat16Params) for part in parts) == bf16
    assert {p.dtype for p in model.parameters()} == {params_dtype}
    assert {p.main_grad.dtype for p in model.parameters()} == {main_grad_dtype}

