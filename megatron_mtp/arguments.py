"""The ``--mtp-*`` command-line flags, and their translation into :class:`MTPConfig`.

``add_mtp_args`` has the signature of Megatron-LM's ``extra_args_provider`` (``pretrain(...,
extra_args_provider=add_mtp_args)``). Megatron-LM itself defines ``--mtp-num-layers`` and
``--mtp-loss-scaling-factor``; when the parser already has them they are kept (same names, same defaults).
"""

import argparse
from typing import Optional, Tuple

from megatron_mtp.config import DEPTH_WEIGHTINGS, LOSS_IMPLEMENTATIONS, MTP_MODES, MTPConfig

def _schedule(text: str) -> Tuple[Tuple[int, float], ...]:
    """``"STEP:LAMBDA,STEP:LAMBDA"`` -> ((STEP, LAMBDA), ...)."""
    entries = []
    for item in text.split(","):
        step, sep, value = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            entries.append((int(step), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected STEP:LAMBDA[,STEP:LAMBDA...], got {text!r}") from None
    return tuple(entries)


def add_mtp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("multi-token prediction")
    existing = {option for action in parser._actions for option in action.option_strings}
    if "--mtp-num-layers" not in existing:
        group.add_argument(
            "--mtp-num-layers", type=int, default=None,
            help="Number of MTP depths (sequential) or heads beside the next-token head (parallel), D. "
            "Depth k predicts token t+k+1. Unset or 0: no MTP.",
        )
    if "--mtp-loss-scaling-factor" not in existing:
        group.add_argument(
            "--mtp-loss-scaling-factor", type=float, default=0.1,
            help="lambda: L = L_main + lambda * sum_k w_k L_k / sum_k w_k. Default 0.1 (Megatron-LM's).",
        )
    group.add_argument(
        "--mtp-mode", choices=MTP_MODES, default="sequential",
        help="sequential: DeepSeek-V3 chained depths (embedding of token t+k + previous depth's state). "
        "parallel: Meta's independent transformer-layer heads on the trunk output.",
    )
    group.add_argument(
        "--mtp-depth-weighting", choices=DEPTH_WEIGHTINGS, default="uniform",
        help="w_k per depth: uniform (Megatron/DeepSeek), harmonic (1/k) or geometric (gamma^(k-1)).",
    )
    group.add_argument(
        "--mtp-geometric-gamma", type=float, default=None,
        help="gamma for --mtp-depth-weighting geometric, in (0, 1]. Default 0.5.",
    )
    group.add_argument(
        "--mtp-loss-scaling-schedule", type=_schedule, default=(),
        help="Step schedule for lambda as STEP:LAMBDA[,STEP:LAMBDA...]; from STEP on lambda takes that value "
        "(before the first entry: --mtp-loss-scaling-factor). DeepSeek-V3 style: "
        "--mtp-loss-scaling-factor 0.3 --mtp-loss-scaling-schedule 90000:0.1",
    )
    group.add_argument(
        "--mtp-loss-implementation", choices=LOSS_IMPLEMENTATIONS, default="chunked",
        help="chunked (default): each depth's output layer + cross-entropy over token chunks, never all logits "
        "at once. plain: full logits per depth, as Megatron-Core's MTP (more memory, same numbers).",
    )
    group.add_argument(
        "--mtp-loss-chunk-size", type=int, default=None,
        help="Tokens per chunk of the chunked losses (MTP depths and --main-loss-implementation chunked). Default 512.",
    )
    group.add_argument(
        "--main-loss-implementation", choices=LOSS_IMPLEMENTATIONS, default=None,
        help="The main next-token loss, with or without MTP. chunked: output layer + cross-entropy over token "
        "chunks, never the fp32 [tokens, vocab/tp] logits and softmax at once (see --main-loss-recompute-logits). "
        "plain: Megatron-Core's output layer and loss. Default: chunked when a micro-batch has more tokens than the "
        "chunk size (then it holds fewer logits). Inference and calls without labels return the logits either way.",
    )
    group.add_argument(
        "--main-loss-recompute-logits", action=argparse.BooleanOptionalAction, default=None,
        help="Chunked main loss: recompute each chunk's logits in backward (nothing vocabulary-sized kept, one more "
        "output-layer matmul per chunk), or with --no-... keep them from forward in the output layer's dtype. "
        "Default: recompute only fp32 logits; with --bf16/--fp16 they are kept in 16 bits (half the bytes of the "
        "plain path's fp32 softmax, no extra matmul).",
    )
    group.add_argument(
        "--mtp-loss-recompute-logits", action=argparse.BooleanOptionalAction, default=None,
        help="Chunked MTP loss: recompute each chunk's logits in backward (no output-weight-sized fp32 buffer per "
        "depth, one more matmul per chunk), or with --no-... always keep the gradients computed in forward (three "
        "matmuls per chunk). Default: chosen per shape; always recompute with --gradient-accumulation-fusion under "
        "Megatron DDP.",
    )
    group.add_argument(
        "--mtp-latent-consistency-weight", type=float, default=0.0,
        help="alpha of the latent consistency loss MSE(h_k[t], stopgrad(h_0[t+k])) (arXiv 2604.06155). 0: off.",
    )
    group.add_argument(
        "--mtp-semantic-anchoring-weight", type=float, default=0.0,
        help="beta of the semantic anchoring loss MSE(h_k[t], stopgrad(E[token t+k+1])) (arXiv 2604.06155). 0: off.",
    )
    return parser


def mtp_config_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> MTPConfig:
    """Build the MTP config; contradictions are reported naming the flags (through ``parser.error`` if given)."""
    try:
        return _config(args)
    except (ValueError, TypeError) as error:
        if parser is not None:
            parser.error(str(error))
        raise


def _config(args: argparse.Namespace) -> MTPConfig:
    num_layers = args.mtp_num_layers or 0
    if args.mtp_num_layers is not None and args.mtp_num_layers < 0:
        raise ValueError(f"--mtp-num-layers must be >= 0, got {args.mtp_num_layers}")
    if args.mtp_mode == "parallel" and num_layers < 1:
        raise ValueError("--mtp-mode parallel needs --mtp-num-layers >= 1 (the number of extra heads)")
    if args.mtp_geometric_gamma is not None and args.mtp_depth_weighting != "geometric":
        raise ValueError(
            f"--mtp-geometric-gamma only applies with --mtp-depth-weighting geometric "
            f"(got --mtp-depth-weighting {args.mtp_depth_weighting})"
        )
    if num_layers == 0 and args.mtp_loss_scaling_schedule:
        raise ValueError("--mtp-loss-scaling-schedule needs --mtp-num-layers >= 1")
    if args.mtp_loss_implementation == "plain" and args.mtp_loss_recompute_logits is not None:
        raise ValueError("--[no-]mtp-loss-recompute-logits applies to --mtp-loss-implementation chunked")
    if args.main_loss_implementation == "plain" and args.main_loss_recompute_logits is not None:
        raise ValueError(
            "--[no-]main-loss-recompute-logits applies to the chunked main loss, not --main-loss-implementation plain"
        )
    all_plain = args.mtp_loss_implementation == args.main_loss_implementation == "plain"
    if args.mtp_loss_chunk_size is not None and all_plain:
        raise ValueError(
            "--mtp-loss-chunk-size applies to --mtp-loss-implementation chunked or --main-loss-implementation chunked"
        )
    try:
        return MTPConfig(
            num_layers=num_layers,
            mode=args.mtp_mode,
            loss_scaling_factor=args.mtp_loss_scaling_factor,
            depth_weighting=args.mtp_depth_weighting,
            geometric_gamma=0.5 if args.mtp_geometric_gamma is None else args.mtp_geometric_gamma,
            loss_scaling_schedule=args.mtp_loss_scaling_schedule,
            loss_implementation=args.mtp_loss_implementation,
            loss_recompute_logits=args.mtp_loss_recompute_logits,
            main_loss_implementation=args.main_loss_implementation,
            main_loss_recompute_logits=args.main_loss_recompute_logits,
            latent_consistency_weight=args.mtp_latent_consistency_weight,
            semantic_anchoring_weight=args.mtp_semantic_anchoring_weight,
            **({} if args.mtp_loss_chunk_size is None else {"loss_chunk_size": args.mtp_loss_chunk_size}),
        )
    except ValueError as error:
        flag = {
            "loss_scaling_factor": "--mtp-loss-scaling-factor",
            "geometric_gamma": "--mtp-geometric-gamma",
            "loss_scaling_schedule": "--mtp-loss-scaling-schedule",
            "loss_chunk_size": "--mtp-loss-chunk-size",
            "latent_consistency_weight": "--mtp-latent-consistency-weight",
            "semantic_anchoring_weight": "--mtp-semantic-anchoring-weight",
        }
        message = str(error)
        for field, name in flag.items():
            message = message.replace(f"MTP {field}", name)
        raise ValueError(message) from None
