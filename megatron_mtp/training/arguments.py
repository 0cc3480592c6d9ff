"""Command-line flags of the pretrain script: Megatron-LM's names, meanings and defaults.

A flag that Megatron-LM also has takes the same values and has the same default (tests/unit/test_megatron_lm_flags.py
checks this against Megatron-LM's own parser); what Megatron-LM requires is required here too. The embedded demo
(a small byte-level GPT on the Python standard library's source files) gives its flags in examples/demo.sh.
"""

import argparse
import os
from typing import List, Optional

from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from megatron_mtp.arguments import add_mtp_args, mtp_config_from_args
from megatron_mtp.data.tokenizers import TOKENIZER_TYPES
from megatron_mtp.model import check_mtp_beside_loss

DEFAULT_SPLIT = "969,30,1"
DEFAULT_DATA_CACHE_PATH = os.path.join(os.path.expanduser("~"), ".cache", "megatron_mtp")
VIRTUAL_PIPELINE_FLAGS = (
    "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank", "pipeline_model_parallel_layout"
)
"""Megatron-LM's flags (by dest) setting virtual pipeline stages per rank (interleaved 1F1B); at most one."""
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters", "lr",
            "tokenizer_type")
"""Flags without a default: Megatron-LM refuses to run without them too (or without a replacement we lack)."""


class _Renamed(argparse.Action):
    """A flag this script once spelled differently from Megatron-LM: using it is an error naming Megatron-LM's."""

    def __init__(self, option_strings, dest, megatron_flag, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.megatron_flag = megatron_flag

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.megatron_flag}, Megatron-LM's name for it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_mtp",
        description="Pretrain a GPT with multi-token prediction on Megatron-Core. Launch with torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--hf-config", default=None,
        help="A Hugging Face DeepSeek-V3 config.json (or its directory): the architecture flags come from it "
        "(giving one with another value is an error); MLA, YaRN, MoE with expert bias, MTP depths.",
    )
    model.add_argument("--num-layers", type=int, default=None, help="Decoder layers (required).")
    model.add_argument(
        "--hybrid-layer-pattern", type=str, default=None,
        help="Build Megatron-Core's HybridModel (megatron-core 0.19+), one layer per symbol: * attention, - MLP, "
        "E MoE (M Mamba on GPU); | between pipeline stages; each /-separated part after the first is one MTP "
        "depth's (or head's) layers, e.g. '*-*E/*-/*-'. Sets --num-layers and --mtp-num-layers.",
    )
    model.add_argument("--hidden-size", type=int, default=None, help="Required.")
    model.add_argument(
        "--ffn-hidden-size", type=int, default=None,
        help="MLP width; default 4 x hidden, with --swiglu 8/3 x hidden rounded down to a multiple of 64.",
    )
    model.add_argument("--num-attention-heads", type=int, default=None, help="Required.")
    model.add_argument("--group-query-attention", action="store_true", help="GQA with --num-query-groups groups.")
    model.add_argument("--num-query-groups", type=int, default=1, help="Key/value groups with --group-query-attention.")
    model.add_argument("--seq-length", type=int, default=None, help="Tokens per sample (required).")
    model.add_argument("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    model.add_argument(
        "--position-embedding-type", type=str, choices=["learned_absolute", "rope", "none"], default="learned_absolute"
    )
    model.add_argument("--rotary-base", type=int, default=10000)
    model.add_argument("--normalization", type=str, choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    model.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GELU.")
    model.add_argument(
        "--disable-bias-linear", action="store_false", dest="add_bias_linear", help="No biases in linear layers."
    )
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--hidden-dropout", type=float, default=0.1)
    model.add_argument("--attention-dropout", type=float, default=0.1)
    model.add_argument("--init-method-std", type=float, default=0.02)
    model.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128,
        help="Pad the vocabulary to a multiple of this times --tensor-model-parallel-size, as Megatron-LM does "
        "(so a checkpoint's embedding shape can depend on TP).",
    )
    model.add_argument("--num-experts", type=int, default=None, help="MoE experts per MoE layer; unset: dense.")
    model.add_argument("--moe-router-topk", type=int, default=2)
    model.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    model.add_argument(
        "--moe-aux-loss-coeff", type=float, nargs="+", default=0.0,
        help="Scale of each load-balancing loss of --moe-router-load-balancing-type, in the same order "
        "(1e-2 is a usual start).",
    )
    model.add_argument(
        "--moe-router-load-balancing-type", type=str, nargs="+", default="aux_loss",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
        help="aux_loss: GShard/Switch load balancing over the micro-batch; seq_aux_loss: per sequence "
        "(DeepSeek-V2/V3); global_aux_loss: over the global batch; sinkhorn: S-BASE routing; none. Several "
        "combine (one --moe-aux-loss-coeff each).",
    )
    model.add_argument("--moe-z-loss-coeff", type=float, default=None, help="Scale of the router z-loss (ST-MoE).")
    model.add_argument(
        "--moe-token-dispatcher-type", type=str, choices=["allgather", "alltoall"], default="allgather",
    )

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--expert-model-parallel-size", type=int, default=1)
    parallel.add_argument(
        "--context-parallel-size", type=int, default=1,
        help="Split every sequence over this many ranks in Megatron's load-balanced layout (2 chunks per rank).",
    )
    parallel.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None,
        help="Decoder layers per virtual pipeline stage: each rank holds several model chunks, trained with the "
        "interleaved 1F1B schedule. MTP lives on the last chunk of the last rank.",
    )
    parallel.add_argument(
        "--num-virtual-stages-per-pipeline-rank", type=int, default=None,
        help="Virtual pipeline stages (model chunks) per pipeline rank; instead of "
        "--num-layers-per-virtual-pipeline-stage.",
    )
    parallel.add_argument(
        "--pipeline-model-parallel-layout", type=str, default=None,
        help="Megatron-Core's pipeline layout, e.g. 'Et|t|tt|mmL': stages split by '|' (pipeline ranks in turn, "
        "then virtual stages); E embedding, t decoder layer, m MTP depth or head (one per --mtp-num-layers), L loss. "
        "Every 'm' must be in the last stage, with the 'L'.",
    )
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--use-distributed-optimizer", action="store_true")
    parallel.add_argument(
        "--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
        help="Accumulate weight gradients into main_grad after the matmul instead of inside it (fused: apex's "
        "kernel on GPU, the CPU bridge's stand-in on CPU).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=None, help="Required.")
    train.add_argument(
        "--global-batch-size", type=int, default=None,
        help="Samples per step over all data-parallel ranks; default micro-batch x DP size.",
    )
    train.add_argument("--train-iters", type=int, default=None, help="Required.")
    train.add_argument("--lr", type=float, default=None, help="Peak learning rate (required).")
    train.add_argument("--min-lr", type=float, default=0.0)
    train.add_argument("--lr-warmup-iters", type=int, default=0)
    train.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    train.add_argument("--lr-decay-style", type=str, choices=["constant", "linear", "cosine"], default="linear")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.999)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present.")
    precision = train.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", action="store_true",
        help="bf16 parameters (Megatron-Core's Float16Module), fp32 main parameters in the optimizer. Without it "
        "(or --fp16): fp32, as in Megatron-LM.",
    )
    precision.add_argument("--fp16", action="store_true", help="Not supported (it needs loss scaling): use --bf16.")
    grad_reduce = train.add_mutually_exclusive_group()
    grad_reduce.add_argument(
        "--accumulate-allreduce-grads-in-fp32", action="store_true",
        help="Accumulate and all-reduce gradients (main_grad) in fp32: the default, with --bf16 as without.",
    )
    grad_reduce.add_argument(
        "--grad-reduce-in-bf16", action="store_true",
        help="With --bf16: accumulate and reduce gradients in bf16 instead (half the gradient buffer and traffic).",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-path", nargs="*", default=None,
        help="Indexed dataset prefixes (tools/preprocess_data.py), optionally weighted: W1 P1 W2 P2 ... "
        "Unset: the Python standard library's source files, byte-level (the embedded default).",
    )
    data.add_argument(
        "--split", type=str, default=None,
        help=f"train,valid,test proportions of each dataset; unset: {DEFAULT_SPLIT} (Megatron-LM's legacy value).",
    )
    data.add_argument(
        "--tokenizer-type", type=str, choices=TOKENIZER_TYPES, default=None,
        help="Required. ByteLevel: UTF-8 bytes (ours, no file); HuggingFaceTokenizer: --tokenizer-model.",
    )
    data.add_argument("--tokenizer-model", type=str, default=None, help="tokenizer.json for HuggingFaceTokenizer.")
    data.add_argument("--reset-position-ids", action="store_true", help="Positions restart after each eod token.")
    data.add_argument(
        "--reset-attention-mask", action="store_true",
        help="Tokens attend only within their document (up to and including its eod): each micro-batch runs as "
        "packed sequences (THD), and MTP depths neither read nor predict across an eod. Needs --eod-mask-loss "
        "when MTP is on.",
    )
    data.add_argument("--eod-mask-loss", action="store_true", help="No loss on predicting the token after an eod.")
    data.add_argument(
        "--data-cache-path", default=None,
        help=f"Where dataset indices and the embedded corpus are cached; unset: {DEFAULT_DATA_CACHE_PATH}.",
    )
    data.add_argument("--data-cache-dir", action=_Renamed, megatron_flag="--data-cache-path")
    data.add_argument("--eval-interval", type=int, default=None, help="Validate every N steps (unset or 0: never).")
    data.add_argument("--eval-iters", type=int, default=100, help="Validation steps per evaluation.")
    data.add_argument("--skip-train", action="store_true", help="Only validate (e.g. a --load checkpoint), then exit.")

    checkpoint = parser.add_argument_group("checkpointing")
    checkpoint.add_argument("--save", type=str, default=None, help="Directory to save torch_dist checkpoints to.")
    checkpoint.add_argument("--load", type=str, default=None, help="Directory to resume from (its latest checkpoint).")
    checkpoint.add_argument(
        "--finetune", action="store_true",
        help="Load only the model weights from --load (no optimizer, scheduler or RNG state; e.g. a checkpoint "
        "from tools/convert_deepseek_v3.py) and start at iteration 0, as Megatron-LM's --finetune.",
    )
    checkpoint.add_argument("--save-interval", type=int, default=None, help="Save every N steps (and at the end).")

    logging = parser.add_argument_group("logging")
    logging.add_argument("--log-interval", type=int, default=100)
    logging.add_argument("--tensorboard-dir", type=str, default=None)
    logging.add_argument("--json-log", default=None, help="Append one JSON line of metrics per logged step.")
    logging.add_argument(
        "--moe-per-layer-logging", action="store_true",
        help="Also write each MoE layer's aux losses to TensorBoard as moe/<name>_layer_<i> (MTP layers after the "
        "decoder's), as Megatron-LM does.",
    )

    add_mtp_args(parser)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hf_config:
        from megatron_mtp.deepseek.training import apply_hf_config

        apply_hf_config(parser, args, argv)
    _apply_hybrid_layer_pattern(parser, args)
    args.mtp_config = mtp_config_from_args(args, parser)
    _check(parser, args)
    return args


def _apply_hybrid_layer_pattern(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--hybrid-layer-pattern sets --num-layers (its decoder layers) and --mtp-num-layers (its MTP parts), as
    Megatron-LM does; another value given for either is an error here (Megatron-LM warns and takes the pattern's)."""
    pattern = args.hybrid_layer_pattern
    if pattern is None:
        return
    from megatron_mtp import compat

    if not compat.HAS_HYBRID_MODEL:
        parser.error(
            f"--hybrid-layer-pattern needs Megatron-Core's HybridModel (megatron-core 0.19+); the installed "
            f"megatron-core is {compat.MEGATRON_CORE_VERSION}"
        )
    if args.hf_config:
        parser.error("--hybrid-layer-pattern and --hf-config describe different models: give one")
    from megatron.core.models.hybrid.hybrid_layer_allocation import (
        get_hybrid_total_layer_count,
        get_hybrid_total_pipeline_segment_count,
        parse_hybrid_pattern,
    )

    try:
        layers, depths = get_hybrid_total_layer_count(pattern), parse_hybrid_pattern(pattern).mtp_num_depths
    except ValueError as error:
        parser.error(f"--hybrid-layer-pattern {pattern!r}: {error}")
    for flag, dest, value in (("--num-layers", "num_layers", layers), ("--mtp-num-layers", "mtp_num_layers", depths)):
        given = getattr(args, dest)
        if given is not None and given != value:
            parser.error(f"{flag} {given} disagrees with --hybrid-layer-pattern {pattern!r}, which gives {value}")
        setattr(args, dest, value)
    stages = get_hybrid_total_pipeline_segment_count(pattern)
    if stages > 1 and stages != args.pipeline_model_parallel_size:
        parser.error(
            f"--hybrid-layer-pattern {pattern!r} has {stages} '|'-separated pipeline stages but "
            f"--pipeline-model-parallel-size is {args.pipeline_model_parallel_size} (virtual pipeline stages are not "
            "supported)"
        )


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters",
                "log_interval", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "expert_model_parallel_size", "context_parallel_size"]
    if args.fp16:
        parser.error("--fp16 is not supported: fp16 needs loss scaling, which this script does not set up; use --bf16")
    if args.grad_reduce_in_bf16 and not args.bf16:
        parser.error("--grad-reduce-in-bf16 needs bf16 parameters: give --bf16")
    missing = [f"--{name.replace('_', '-')}" for name in REQUIRED if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.finetune and not args.load:
        parser.error("--finetune loads model weights from --load; give --load")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % args.num_attention_heads:
        parser.error(f"--hidden-size {args.hidden_size} must be divisible by --num-attention-heads {args.num_attention_heads}")
    args.virtual_pipeline_model_parallel_size = _virtual_pipeline_size(parser, args)
    virtual = args.virtual_pipeline_model_parallel_size
    if virtual and args.hybrid_layer_pattern:
        parser.error("--hybrid-layer-pattern does not support virtual pipeline stages yet")
    if args.hybrid_layer_pattern and (args.context_parallel_size > 1 or args.reset_attention_mask):
        parser.error("--hybrid-layer-pattern does not support --context-parallel-size > 1 or --reset-attention-mask yet")
    if args.pipeline_model_parallel_layout is None and "|" not in (args.hybrid_layer_pattern or ""):
        if args.num_layers % (args.pipeline_model_parallel_size * (virtual or 1)):
            parser.error(
                f"--num-layers {args.num_layers} must be divisible by --pipeline-model-parallel-size "
                f"{args.pipeline_model_parallel_size}" + (f" x {virtual} virtual stages per rank" if virtual else "")
            )
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        parser.error("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        parser.error("--seq-length must be divisible by --tensor-model-parallel-size with --sequence-parallel")
    if args.context_parallel_size > 1:
        split = 2 * args.context_parallel_size * (args.tensor_model_parallel_size if args.sequence_parallel else 1)
        if args.seq_length % split:
            parser.error(
                f"--seq-length {args.seq_length} must be divisible by {split}: 2 x --context-parallel-size"
                + (" x --tensor-model-parallel-size (--sequence-parallel)" if args.sequence_parallel else "")
            )
    if args.moe_per_layer_logging and not args.tensorboard_dir:
        parser.error("--moe-per-layer-logging writes to TensorBoard: give --tensorboard-dir")
    if args.expert_model_parallel_size > 1 and not args.num_experts:
        parser.error("--expert-model-parallel-size > 1 needs --num-experts")
    if args.num_experts and args.num_experts % args.expert_model_parallel_size:
        parser.error(f"--num-experts {args.num_experts} must be divisible by --expert-model-parallel-size")
    if args.pipeline_model_parallel_layout is not None and args.mtp_config.enabled:
        try:
            check_mtp_beside_loss(
                PipelineParallelLayerLayout(args.pipeline_model_parallel_layout, args.pipeline_model_parallel_size)
            )
        except NotImplementedError as error:
            parser.error(str(error))
    if args.mtp_config.num_layers >= args.seq_length:
        parser.error(f"--mtp-num-layers {args.mtp_config.num_layers} must be smaller than --seq-length {args.seq_length}")
    if args.reset_attention_mask and args.mtp_config.enabled and not args.eod_mask_loss:
        parser.error(
            "--reset-attention-mask with MTP needs --eod-mask-loss: the label at each eod is the next document's "
            "first token, which the MTP depths would otherwise predict across the document boundary"
        )
    if args.reset_attention_mask and args.context_parallel_size > 1:
        parser.error("--reset-attention-mask (packed documents) with --context-parallel-size > 1 is not supported")
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        parser.error("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/tokenizer.json")
    if args.skip_train and args.eval_iters < 1:
        parser.error("--skip-train needs --eval-iters >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        parser.error("--save-interval must be >= 1")
    if args.save_interval and not args.save:
        parser.error("--save-interval needs --save DIR")
    if args.data_path and len(args.data_path) > 1 and _looks_weighted(args.data_path) is None:
        parser.error("--data-path: give prefixes only, or WEIGHT PREFIX pairs")
    coeffs, types = _as_list(args.moe_aux_loss_coeff), _as_list(args.moe_router_load_balancing_type)
    if len(coeffs) != len(types):
        parser.error(f"give one --moe-aux-loss-coeff per --moe-router-load-balancing-type, got {coeffs} for {types}")
    # One loss type is a plain value, as Megatron-Core's own default is.
    args.moe_aux_loss_coeff, args.moe_router_load_balancing_type = (coeffs[0], types[0]) if len(types) == 1 else (coeffs, types)
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if not args.group_query_attention:  # Megatron-LM ignores --num-query-groups then: one group per head
        args.num_query_groups = None
    args.split = args.split or DEFAULT_SPLIT
    args.data_cache_path = args.data_cache_path or DEFAULT_DATA_CACHE_PATH
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        parser.error(
            f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than --lr-decay-iters "
            f"({args.lr_decay_iters}; default --train-iters)"
        )
    if args.ffn_hidden_size is None:  # Megatron-LM's rule
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size


def _virtual_pipeline_size(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[int]:
    """Virtual pipeline stages per rank from Megatron-LM's three flags (at most one given), as Megatron-LM derives
    it; None for one stage per rank."""
    given = [
        f"--{dest.replace('_', '-')}" for dest in VIRTUAL_PIPELINE_FLAGS if getattr(args, dest) is not None
    ]
    if len(given) > 1:
        parser.error(f"give at most one of {', '.join(given)}")
    for dest in VIRTUAL_PIPELINE_FLAGS[:2]:
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            parser.error(f"--{dest.replace('_', '-')} must be >= 1, got {getattr(args, dest)}")
    pp = args.pipeline_model_parallel_size
    if args.pipeline_model_parallel_layout is not None:
        try:
            stages = PipelineParallelLayerLayout.get_num_stages_from_str(args.pipeline_model_parallel_layout)
        except AssertionError as error:  # Megatron-Core's message names the character it does not know
            parser.error(f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout}: {error}")
        if stages % pp:
            parser.error(
                f"--pipeline-model-parallel-layout has {stages} stages, not a multiple of "
                f"--pipeline-model-parallel-size {pp}"
            )
        size = stages // pp
    elif args.num_layers_per_virtual_pipeline_stage is not None:
        per_rank = args.num_layers // pp
        if args.num_layers % pp or per_rank % args.num_layers_per_virtual_pipeline_stage:
            parser.error(
                f"--num-layers {args.num_layers} / --pipeline-model-parallel-size {pp} must be a multiple of "
                f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage}"
            )
        size = per_rank // args.num_layers_per_virtual_pipeline_stage
    else:
        size = args.num_virtual_stages_per_pipeline_rank or 1
    if size > 1 and pp == 1:
        parser.error(f"{given[0]}: virtual pipeline stages need --pipeline-model-parallel-size > 1")
    return size if size > 1 else None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _looks_weighted(paths: List[str]) -> Optional[bool]:
    """True for W P W P..., False for P P..., None if mixed."""
    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    numbers = [is_number(p) for p in paths]
    if not any(numbers):
        return False
    if len(paths) % 2 == 0 and all(numbers[0::2]) and not any(numbers[1::2]):
        return True
    return None
