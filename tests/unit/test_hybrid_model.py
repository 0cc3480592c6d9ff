"""MTP on Megatron-Core's ``HybridModel`` (0.19+; the 0.19 suite runs these), one process, fp32:

- sequential MTP has the parameter and checkpoint names of ``HybridModel``'s own MTP and gives its losses,
  per-depth losses, MoE aux-loss log and gradients for the same weights, MoE layers with aux losses in the decoder
  and the MTP depths. As against ``GPTModel``'s MTP (``tests/distributed/test_megatron_reference.py``), only row 0
  of the word-embedding gradient differs: the positions past the sequence end read token 0's embedding and ours
  sends no aux-loss gradient there;
- a hybrid model of attention + MLP layers (``"*-*-/*-/*-"``) is the GPT model with the same layers, in both MTP
  modes: the same losses, MTP metrics and gradients (weights renamed across);
- parallel heads train; Mamba layers, and patterns that do not fit the MTP or layer settings, are refused.
"""

import pytest
import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_mtp.compat import (
    HAS_HYBRID_MODEL,
    megatron_core_mtp_logged_losses,
    moe_aux_loss_values,
    reset_moe_aux_loss_log,
)
from megatron_mtp.config import MTPConfig
from megatron_mtp.loss import MTPStats
from tiny import build_model, grad_of, make_batches, train_step, transformer_config, wrap_ddp

needs_hybrid_model = pytest.mark.skipif(
    not HAS_HYBRID_MODEL,
    reason="Megatron-Core has HybridModel from 0.19 (megatron.core.models.hybrid); the 0.19 suite runs this",
)
if HAS_HYBRID_MODEL:
    from hybrid_tiny import build_hybrid_model, build_megatron_core_hybrid_model, hybrid_config, hybrid_state_from_gpt

DEPTHS = 2
MICROBATCHES = 2
MOE = dict(num_experts=4, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


@pytest.mark.skipif(HAS_HYBRID_MODEL, reason="this Megatron-Core has HybridModel: nothing to refuse")
def test_refused_without_hybrid_model():
    with pytest.raises(RuntimeError, match=r"HybridModel .*0\.19\+.* installed megatron-core is 0\.16"):
        import megatron_mtp.hybrid  # noqa: F401


def _train_step(model, stats=None):
    """One Megatron training step (2 micro-batches) on a DDP-wrapped ``model``: losses, MoE log and gradients."""
    MTPLossLoggingHelper.tracker.clear()
    reset_moe_aux_loss_log()
    ddp = wrap_ddp(model, model.config)
    losses = train_step(ddp, model.config, make_batches(MICROBATCHES), stats)
    return dict(
        losses=torch.stack(losses),
        moe_log={name: values.clone() for name, values in moe_aux_loss_values().items()},
        grads={name: grad_of(param).clone() for name, param in model.named_parameters()},
    )


def _checkpoint_keys(model) -> dict:
    """Each entry of ``model``'s sharded state dict and the key it has in a torch_dist checkpoint."""
    return {name: getattr(entry, "key", None) for name, entry in model.sharded_state_dict().items()}


@needs_hybrid_model
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sequential_mode_matches_hybrid_model_mtp(single_process, tied):
    mtp = MTPConfig(num_layers=DEPTHS)
    reference = build_megatron_core_hybrid_model(hybrid_config(mtp, **MOE), tied=tied)
    ours = build_hybrid_model(hybrid_config(mtp, **MOE), mtp, tied=tied)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert _checkpoint_keys(ours) == _checkpoint_keys(reference)  # torch_dist checkpoints move between the two

    expected = _train_step(reference)
    # Megatron-Core logs each micro-batch's mean loss per depth; every micro-batch masks the same positions.
    expected_depth_losses = megatron_core_mtp_logged_losses() / MICROBATCHES
    stats = MTPStats(DEPTHS)
    got = _train_step(ours, stats)

    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-5, rtol=0)
    summary = stats.summary()
    depth_losses = torch.tensor([summary[f"mtp_{k}_loss"] for k in range(1, DEPTHS + 1)])
    torch.testing.assert_close(depth_losses, expected_depth_losses.float(), atol=1e-5, rtol=0)
    assert sorted(got["moe_log"]) == sorted(expected["moe_log"]) == ["load_balancing_loss", "z_loss"]
    for name, values in got["moe_log"].items():
        torch.testing.assert_close(values, expected["moe_log"][name], atol=1e-5, rtol=0, msg=name)
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in got["grads"].items():
        reference_grad = expected["grads"][name]
        if name == "embedding.word_embeddings.weight":  # the tail's aux-loss share in row 0 (see above)
            assert (grad[0] - reference_grad[0]).abs().max() > 0  # the caveat is real, so the exemption is needed
            grad, reference_grad = grad[1:], reference_grad[1:]
        torch.testing.assert_close(grad, reference_grad, atol=1e-5, rtol=0, msg=name)
    for depth in range(DEPTHS):
        assert got["grads"][f"mtp.layers.{depth}.eh_proj.weight"].abs().max() > 0


@needs_hybrid_model
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_attention_and_mlp_layers_equal_gpt_model(single_process, mode):
    mtp = MTPConfig(num_layers=DEPTHS, mode=mode, loss_chunk_size=7, latent_consistency_weight=0.2)
    gpt = build_model(transformer_config(mtp, num_layers=2), mtp)
    hybrid = build_hybrid_model(hybrid_config(mtp, pattern="*-*-/*-/*-"), mtp, pattern="*-*-/*-/*-")
    hybrid.load_state_dict(hybrid_state_from_gpt(gpt.state_dict()), strict=True)

    gpt_stats, hybrid_stats = MTPStats(DEPTHS), MTPStats(DEPTHS)
    expected, got = _train_step(gpt, gpt_stats), _train_step(hybrid, hybrid_stats)

    torch.testing.assert_close(got["losses"], expected["losses"], atol=1e-5, rtol=0)
    torch.testing.assert_close(hybrid_stats.values, gpt_stats.values, atol=1e-5, rtol=0)
    expected_grads = hybrid_state_from_gpt(expected["grads"])
    assert got["grads"].keys() == expected_grads.keys()
    for name, grad in got["grads"].items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=0, msg=name)
    assert all(got["grads"][f"mtp.layers.{k}.final_layernorm.weight"].abs().max() > 0 for k in range(DEPTHS))


@needs_hybrid_model
def test_parallel_heads_train(single_process):
    """Adam steps on one batch lower the next-token loss and every head's loss."""
    mtp = MTPConfig(num_layers=DEPTHS, mode="parallel", loss_scaling_factor=1.0)
    model = build_hybrid_model(hybrid_config(mtp, **MOE), mtp)
    ddp = wrap_ddp(model, model.config)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0), [ddp])
    batches = make_batches(1)
    history = []
    for _ in range(8):
        stats = MTPStats(DEPTHS)
        (loss,) = train_step(ddp, model.config, batches, stats)
        summary = stats.summary()
        history.append([loss[0] / loss[1]] + [summary[f"mtp_{k}_loss"] for k in range(1, DEPTHS + 1)])
        optimizer.step()
    first, last = torch.tensor(history[0]), torch.tensor(history[-1])
    assert (last < first - 0.1).all(), history


@needs_hybrid_model
def test_refusals(single_process):
    mtp = MTPConfig(num_layers=1)
    with pytest.raises(ValueError, match=r"'M\*M-/\*-'.*'M'.*CUDA kernels"):
        build_hybrid_model(hybrid_config(mtp, pattern="M*M-/*-"), mtp, pattern="M*M-/*-")
    with pytest.raises(ValueError, match=r"'\*-\*-/\*-/\*-' has 2 MTP part\(s\).*num_layers is 1"):
        build_hybrid_model(hybrid_config(mtp, pattern="*-*-/*-/*-"), mtp, pattern="*-*-/*-/*-")
    with pytest.raises(ValueError, match=r"num_layers is 3 but hybrid layer pattern '\*-\*-/\*-' has 4"):
        build_hybrid_model(transformer_config(mtp, num_layers=3), mtp, pattern="*-*-/*-")


PRETRAIN_FLAGS = ["--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
                  "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--tokenizer-type", "ByteLevel"]


def test_pretrain_flag_hybrid_layer_pattern(capsys):
    """Megatron-LM's --hybrid-layer-pattern: refused without HybridModel; else it sets --num-layers and
    --mtp-num-layers (a different value given for either is an error) and goes into the checkpoint signature
    (without its pipeline stages), so a GPT run refuses a hybrid checkpoint."""
    from megatron_mtp.training.arguments import parse_args
    from megatron_mtp.training.checkpointing import model_signature

    if not HAS_HYBRID_MODEL:
        with pytest.raises(SystemExit):
            parse_args([*PRETRAIN_FLAGS, "--hybrid-layer-pattern", "*-*-/*-"])
        assert "--hybrid-layer-pattern needs Megatron-Core's HybridModel (megatron-core 0.19+)" in capsys.readouterr().err
        return
    args = parse_args([*PRETRAIN_FLAGS, "--hybrid-layer-pattern", "*-*E/*-/*-", "--mtp-mode", "parallel"])
    assert (args.num_layers, args.mtp_num_layers) == (4, 2)
    assert (args.mtp_config.num_layers, args.mtp_config.mode) == (2, "parallel")
    assert model_signature(args, 320)["hybrid_layer_pattern"] == "*-*E/*-/*-"
    staged = ["--hybrid-layer-pattern", "*-|*E/*-/*-", "--pipeline-model-parallel-size", "2"]
    assert model_signature(parse_args([*PRETRAIN_FLAGS, *staged]), 320)["hybrid_layer_pattern"] == "*-*E/*-/*-"
    assert model_signature(parse_args([*PRETRAIN_FLAGS, "--num-layers", "2"]), 320)["hybrid_layer_pattern"] is None
    disagreeing = "disagrees with --hybrid-layer-pattern '*-*-/*-', which gives"
    for pattern, flags, message in (
        ("*-*-/*-", ["--num-layers", "2"], f"--num-layers 2 {disagreeing} 4"),
        ("*-*-/*-", ["--mtp-num-layers", "2"], f"--mtp-num-layers 2 {disagreeing} 1"),
        ("*-|*-/*-", ["--pipeline-model-parallel-size", "3"], "2 '|'-separated pipeline stages but "
         "--pipeline-model-parallel-size is 3"),
    ):
        with pytest.raises(SystemExit):
            parse_args([*PRETRAIN_FLAGS, "--hybrid-layer-pattern", pattern, *flags])
        assert message in capsys.readouterr().err
