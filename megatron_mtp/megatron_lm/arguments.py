"""Our ``--mtp-*`` flags inside Megatron-LM's parser, and the checks of their combination with Megatron-LM's."""

import argparse
from dataclasses import replace
from typing import Callable, Optional

from megatron.core.transformer.pipeline_parallel_layer_layout import LayerType, PipelineParallelLayerLayout

from megatron_mtp.arguments import add_mtp_args, mtp_config_from_args
from megatron_mtp.config import MTPConfig

MEGATRON_CORE_MTP_ONLY_FLAGS = {
    "mtp_use_repeated_layer": "--mtp-use-repeated-layer",
    "mtp_detach_heads": "--mtp-detach-heads",
}
"""Megatron-LM flags (by dest) of Megatron-Core's own MTP that megatron_mtp's MTP does not implement."""

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def mtp_extra_args_provider(chained: Optional[ExtraArgsProvider] = None) -> ExtraArgsProvider:
    """An ``extra_args_provider`` for Megatron-LM adding our flags after ``chained``'s (e.g. ModelOpt's).

    Megatron-LM already defines ``--mtp-num-layers`` and ``--mtp-loss-scaling-factor``; they are kept.
    """

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if chained is not None:
            parser = chained(parser)
        return add_mtp_args(parser)

    return provider


def mtp_config_from_megatron_args(args: argparse.Namespace) -> MTPConfig:
    """The MTP config of a Megatron-LM run; combinations megatron_mtp cannot run are errors naming the flags."""
    config = replace(mtp_config_from_args(args), ddp_overlaps_grad_reduce=getattr(args, "overlap_grad_reduce", True))
    if not config.enabled:
        return config
    for dest, flag in MEGATRON_CORE_MTP_ONLY_FLAGS.items():
        if getattr(args, dest, False):
            raise ValueError(
                f"{flag} is an option of Megatron-Core's own MTP, which megatron_mtp replaces "
                f"(--mtp-num-layers {args.mtp_num_layers} --mtp-mode {config.mode}); it is not supported: drop {flag}"
            )
    if getattr(args, "overlap_moe_expert_parallel_comm", False):
        raise ValueError(
            "--overlap-moe-expert-parallel-comm builds Megatron-Core's schedule plan, which megatron_mtp's MTP "
            "does not provide: drop it or --mtp-num-layers"
        )
    _check_layout(args, config)
    return config


def _check_layout(args: argparse.Namespace, config: MTPConfig) -> None:
    """MTP ('m' in ``--pipeline-model-parallel-layout``) must sit on the last pipeline stage, all of it."""
    layout = getattr(args, "pipeline_model_parallel_layout", None)
    if layout is None:
        return
    if not isinstance(layout, PipelineParallelLayerLayout):
        layout = PipelineParallelLayerLayout(layout, args.pipeline_model_parallel_size)
    stages = [stage for rank_stages in layout.layout for stage in rank_stages]  # the loss stage last
    on_last = stages[-1].count(LayerType.mtp)
    elsewhere = sum(stage.count(LayerType.mtp) for stage in stages[:-1])
    if elsewhere or on_last != config.num_layers:
        raise ValueError(
            f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout!r} places {elsewhere} of the "
            f"MTP layers ('m') off the last pipeline stage and {on_last} on it: megatron_mtp runs all "
            f"--mtp-num-layers {config.num_layers} MTP {'heads' if config.mode == 'parallel' else 'depths'} on the "
            "last stage, with the loss (e.g. ...|t,m,L); other placements are not supported yet"
        )
