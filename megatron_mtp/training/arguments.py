"""Command-line flags of the pretrain script, with Megatron-LM's names.

The defaults are the embedded demo: a small byte-level GPT with one sequential MTP depth, trained on the
Python standard library's source files, on CPU in a few minutes.
"""

import argparse
import os
from typing import List, Optional

from megatron_mtp.arguments import add_mtp_args, mtp_config_from_args


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
    model.add_argument("--num-layers", type=int, default=4, help="Decoder layers.")
    model.add_argument("--hidden-size", type=int, default=128)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP width; default 4 x hidden.")
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--num-query-groups", type=int, default=None, help="GQA groups; default = heads.")
    model.add_argument("--seq-length", type=int, default=256, help="Tokens per sample.")
    model.add_argument("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    model.add_argument(
        "--position-embedding-type", choices=["rope", "learned_absolute", "none"], default="rope"
    )
    model.add_argument("--rotary-base", type=int, default=10000)
    model.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="RMSNorm")
    model.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GELU.")
    model.add_argument("--disable-bias-linear", action="store_true", help="No biases in linear layers.")
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--hidden-dropout", type=float, default=0.0)
    model.add_argument("--attention-dropout", type=float, default=0.0)
    model.add_argument("--init-method-std", type=float, default=0.02)
    model.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128,
        help="Pad the vocabulary to a multiple of this (and of the TP size). Unlike Megatron-LM the multiple is "
        "not multiplied by TP, so the embedding keeps its shape and checkpoints move between TP sizes.",
    )
    model.add_argument("--num-experts", type=int, default=None, help="MoE experts per MoE layer; unset: dense.")
    model.add_argument("--moe-router-topk", type=int, default=2)
    model.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    model.add_argument(
        "--moe-aux-loss-coeff", type=float, default=0.0,
        help="Scale of the load-balancing loss chosen by --moe-router-load-balancing-type (1e-2 is a usual start).",
    )
    model.add_argument(
        "--moe-router-load-balancing-type", default="aux_loss",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
        help="aux_loss: GShard/Switch load balancing over the micro-batch; seq_aux_loss: per sequence "
        "(DeepSeek-V2/V3); global_aux_loss: over the global batch; sinkhorn: S-BASE routing; none.",
    )
    model.add_argument("--moe-z-loss-coeff", type=float, default=None, help="Scale of the router z-loss (ST-MoE).")
    model.add_argument(
        "--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather",
    )

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--expert-model-parallel-size", type=int, default=1)
    for flag in ("--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"):
        parallel.add_argument(flag, type=int, default=None, help="Virtual pipeline stages: not supported yet (an error).")
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--use-distributed-optimizer", action="store_true")

    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=8)
    train.add_argument(
        "--global-batch-size", type=int, default=None,
        help="Samples per step over all data-parallel ranks; default micro-batch x DP size.",
    )
    train.add_argument("--train-iters", type=int, default=300)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--min-lr", type=float, default=2e-4)
    train.add_argument("--lr-warmup-iters", type=int, default=20)
    train.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    train.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.95)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present.")
    precision = train.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", action="store_true", default=None,
        help="bf16 parameters (Megatron-Core's Float16Module), fp32 main parameters in the optimizer. Default on GPU.",
    )
    precision.add_argument("--fp16", action="store_true", help="Not supported (it needs loss scaling): use --bf16.")
    precision.add_argument("--fp32", action="store_true", help="Default on CPU.")
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
        "--data-path", nargs="+", default=None,
        help="Indexed dataset prefixes (tools/preprocess_data.py), optionally weighted: W1 P1 W2 P2 ... "
        "Unset: the Python standard library's source files, byte-level (the embedded default).",
    )
    data.add_argument("--split", default="969,30,1", help="train,valid,test proportions of each dataset.")
    data.add_argument("--tokenizer-type", choices=["ByteLevel", "HuggingFace"], default="ByteLevel")
    data.add_argument("--tokenizer-model", default=None, help="tokenizer.json for --tokenizer-type HuggingFace.")
    data.add_argument(
        "--data-cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_mtp"),
        help="Where dataset indices and the embedded corpus are cached.",
    )
    data.add_argument("--eval-interval", type=int, default=100, help="Validate every N steps (0: never).")
    data.add_argument("--eval-iters", type=int, default=4, help="Validation steps per evaluation.")
    data.add_argument("--skip-train", action="store_true", help="Only validate (e.g. a --load checkpoint), then exit.")

    checkpoint = parser.add_argument_group("checkpointing")
    checkpoint.add_argument("--save", default=None, help="Directory to save torch_dist checkpoints to.")
    checkpoint.add_argument("--load", default=None, help="Directory to resume from (its latest checkpoint).")
    checkpoint.add_argument(
        "--finetune", action="store_true",
        help="Load only the model weights from --load (no optimizer, scheduler or RNG state; e.g. a checkpoint "
        "from tools/convert_deepseek_v3.py) and start at iteration 0, as Megatron-LM's --finetune.",
    )
    checkpoint.add_argument("--save-interval", type=int, default=None, help="Save every N steps (and at the end).")

    logging = parser.add_argument_group("logging")
    logging.add_argument("--log-interval", type=int, default=10)
    logging.add_argument("--tensorboard-dir", default=None)
    logging.add_argument("--json-log", default=None, help="Append one JSON line of metrics per logged step.")
    logging.add_argument(
        "--moe-per-layer-logging", action="store_true",
        help="Also write each MoE layer's aux losses to TensorBoard as moe/<name>_layer_<i> (MTP layers after the "
        "decoder's), as Megatron-LM does.",
    )

    add_mtp_args(parser)
    parser.set_defaults(mtp_num_layers=1)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hf_config:
        from megatron_mtp.deepseek.training import apply_hf_config

        apply_hf_config(parser, args, argv)
    args.mtp_config = mtp_config_from_args(args, parser)
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters",
                "log_interval", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "expert_model_parallel_size"]
    if args.fp16:
        parser.error("--fp16 is not supported: fp16 needs loss scaling, which this script does not set up; use --bf16")
    if args.grad_reduce_in_bf16 and args.fp32:
        parser.error("--grad-reduce-in-bf16 needs bf16 parameters (--bf16), not --fp32")
    if args.finetune and not args.load:
        parser.error("--finetune loads model weights from --load; give --load")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % args.num_attention_heads:
        parser.error(f"--hidden-size {args.hidden_size} must be divisible by --num-attention-heads {args.num_attention_heads}")
    if args.num_layers % args.pipeline_model_parallel_size:
        parser.error(
            f"--num-layers {args.num_layers} must be divisible by --pipeline-model-parallel-size "
            f"{args.pipeline_model_parallel_size}"
        )
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        parser.error("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % args.tensor_model_parallel_size:
        parser.error("--seq-length must be divisible by --tensor-model-parallel-size with --sequence-parallel")
    if args.moe_per_layer_logging and not args.tensorboard_dir:
        parser.error("--moe-per-layer-logging writes to TensorBoard: give --tensorboard-dir")
    if args.expert_model_parallel_size > 1 and not args.num_experts:
        parser.error("--expert-model-parallel-size > 1 needs --num-experts")
    if args.num_experts and args.num_experts % args.expert_model_parallel_size:
        parser.error(f"--num-experts {args.num_experts} must be divisible by --expert-model-parallel-size")
    if args.mtp_config.num_layers >= args.seq_length:
        parser.error(f"--mtp-num-layers {args.mtp_config.num_layers} must be smaller than --seq-length {args.seq_length}")
    if args.tokenizer_type == "HuggingFace" and not args.tokenizer_model:
        parser.error("--tokenizer-type HuggingFace needs --tokenizer-model PATH/tokenizer.json")
    if args.skip_train and args.eval_iters < 1:
        parser.error("--skip-train needs --eval-iters >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        parser.error("--save-interval must be >= 1")
    if args.save_interval and not args.save:
        parser.error("--save-interval needs --save DIR")
    if args.data_path and len(args.data_path) > 1 and _looks_weighted(args.data_path) is None:
        parser.error("--data-path: give prefixes only, or WEIGHT PREFIX pairs")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        parser.error(
            f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than --lr-decay-iters "
            f"({args.lr_decay_iters}; default --train-iters)"
        )
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size


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
