"""Megatron-LM's ``forward_step`` with the MTP step passed to the model and per-depth metrics in its report."""

from functools import partial
from typing import Callable, Dict

import torch
from megatron.training import get_args

from megatron_mtp.loss.metrics import STAT_FIELDS, MTPStats
from megatron_mtp.megatron_lm.arguments import mtp_config_from_megatron_args

ForwardStep = Callable[..., tuple]

REPORTED = {"loss": "loss_sum", "acc": "correct_label", "acc_main": "correct_main"}
"""Report name suffix -> the ``MTPStats`` field summed over tokens; with latent losses also their MSE sums."""
LATENT_REPORTED = {"latent_consistency": "latent_consistency_sum", "semantic_anchoring": "semantic_anchoring_sum"}


def mtp_forward_step(forward_step: ForwardStep) -> ForwardStep:
    """Wrap ``pretrain_gpt.forward_step`` (its batch, model call and ``loss_func`` are kept).

    With MTP on, the model is called with ``mtp_step`` (the training iteration, for
    ``--mtp-loss-scaling-schedule``), ``mtp_stats`` and ``compute_mtp=True`` (validation too), and the loss
    function's report gains, per depth k, ``mtp_k loss``, ``mtp_k acc`` (top-1 equals the label) and
    ``mtp_k acc_main`` (top-1 equals the main model's), as ``[sum, tokens]`` pairs: Megatron-LM sums them over
    micro-batches and data-parallel ranks, divides, averages over the log interval and prints and writes them to
    TensorBoard beside ``lm loss``.
    """

    def step(data_iterator, model, return_schedule_plan: bool = False):
        args = get_args()
        mtp_config = mtp_config_from_megatron_args(args)
        if not mtp_config.enabled:
            return forward_step(data_iterator, model, return_schedule_plan=return_schedule_plan)
        if return_schedule_plan:
            raise NotImplementedError("megatron_mtp's MTP does not build Megatron-Core's schedule plan")
        stats = MTPStats(mtp_config.num_layers, mtp_config.latent_losses)
        options = dict(mtp_stats=stats, mtp_step=getattr(args, "curr_iteration", args.iteration), compute_mtp=True)
        output, loss_func = forward_step(data_iterator, _CalledWith(model, options))
        return output, partial(_with_mtp_report, loss_func, stats)

    return step


class _CalledWith:
    """``model`` (wrapped or not), called with extra keyword arguments; attributes are the model's."""

    def __init__(self, model: torch.nn.Module, extra_kwargs: Dict):
        self._model = model
        self._extra_kwargs = extra_kwargs

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs, **self._extra_kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _with_mtp_report(loss_func: Callable, stats: MTPStats, output_tensor: torch.Tensor):
    loss, num_tokens, report = loss_func(output_tensor)
    return loss, num_tokens, {**report, **mtp_report(stats, output_tensor.device)}


def mtp_report(stats: MTPStats, device: torch.device) -> Dict[str, torch.Tensor]:
    """``{"mtp_k <name>": [sum, tokens]}`` (fp32, as ``lm loss``) from one micro-batch's counts."""
    if stats.values is None:
        raise RuntimeError("the model ran no MTP on the last pipeline stage: no per-depth counts to report")
    reported = {**REPORTED, **(LATENT_REPORTED if stats.latent_losses else {})}
    values = stats.values.to(device=device, dtype=torch.float32)
    tokens = values[:, STAT_FIELDS.index("tokens")]
    report = {}
    for depth in range(1, stats.num_depths + 1):
        for name, field in reported.items():
            report[f"mtp_{depth} {name}"] = torch.stack((values[depth - 1, STAT_FIELDS.index(field)], tokens[depth - 1]))
    return report
