"""Our dist-checkpoint save/load restores every parameter and optimizer tensor exactly, at TP=2 with MTP:
after one more training step from the saved and the restored state, the two models are identical."""

import os
import tempfile

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mtp.config import MTPConfig
from megatron_mtp.training.checkpointing import load_checkpoint, save_checkpoint
from mp_world import run_world
from tiny import build_model, make_batches, train_step, transformer_config, wrap_ddp


def _build(mtp, seed):
    from megatron_mtp import cpu_bridge

    cpu_bridge.manual_seed(seed)
    config = transformer_config(mtp, tp=2)
    model = wrap_ddp(build_model(config, mtp), config)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4), [model])
    scheduler = OptimizerParamScheduler(optimizer, 0.0, 1e-3, 1e-4, 1, 10, "cosine", 0.0, 0.0, 10, "constant")
    return config, model, optimizer, scheduler


def _roundtrip(root, mode):
    mtp = MTPConfig(num_layers=2, mode=mode)
    config, model, optimizer, scheduler = _build(mtp, seed=1)
    train_step(model, config, make_batches(2))
    optimizer.step()
    scheduler.step(increment=4)
    save_checkpoint(root, 1, model.module, optimizer, scheduler, {"consumed_samples": 4}, {"mode": mode})
    _, restored, restored_optimizer, restored_scheduler = _build(mtp, seed=99)
    iteration, state = load_checkpoint(root, restored.module, restored_optimizer, restored_scheduler, {"mode": mode})
    for trained_model, trained_optimizer, trained_scheduler in ((model, optimizer, scheduler), (restored, restored_optimizer, restored_scheduler)):
        trained_optimizer.zero_grad()
        train_step(trained_model, config, make_batches(2, seed=7))
        trained_optimizer.step()
        trained_scheduler.step(increment=4)
    params = dict(restored.module.named_parameters())
    param_diffs = {n: (p - params[n]).abs().max().item() for n, p in model.module.named_parameters()}
    saved_state, loaded_state = optimizer.optimizer.state_dict()["state"], restored_optimizer.optimizer.state_dict()["state"]
    optimizer_diffs = {
        f"{index}.{name}": (value.float() - loaded_state[index][name].float()).abs().max().item()
        for index, entry in saved_state.items()
        for name, value in entry.items()
        if torch.is_tensor(value)
    }
    return dict(iteration=iteration, state=state, params=param_diffs, optimizer=optimizer_diffs,
                lr=(scheduler.get_lr(optimizer.param_groups[0]), restored_scheduler.get_lr(restored_optimizer.param_groups[0])))


def test_checkpoint_roundtrip_restores_everything_at_tp2(single_process):
    with tempfile.TemporaryDirectory() as root:
        for mode in ("sequential", "parallel"):
            results = run_world(_roundtrip, 2, os.path.join(root, mode), mode, tp=2)
            for rank, result in enumerate(results):
                assert result["iteration"] == 1 and result["state"] == {"consumed_samples": 4}
                assert {n: d for n, d in result["params"].items() if d} == {}, (mode, rank)
                assert {n: d for n, d in result["optimizer"].items() if d} == {}, (mode, rank)
                assert result["lr"][0] == result["lr"][1]
