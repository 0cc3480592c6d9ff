"""Generate text from a checkpoint of the pretrain script: KV-cached greedy decoding, or self-speculative decoding
with the model's MTP layers as drafts (the same tokens, fewer main-model forwards).

    python -m megatron_mtp.generate --load runs/demo/ckpt --prompt "def main(" --max-new-tokens 128 --speculative
    torchrun --nproc-per-node 2 -m megatron_mtp.generate --tensor-model-parallel-size 2 --load ... --speculative

Model flags are the pretrain script's; those the checkpoint records in its model signature (layers, sizes, MTP
depths and mode, ...) default to the checkpoint's values, and one given with another value is an error. Flags it
does not record (``--seq-length``, ``--rotary-base``, the tokenizer) must be given as in training when not the
defaults. Prints the text, then tokens/s, tokens per main-model forward and the acceptance per draft position.
"""

import argparse
import sys
from typing import List, Optional

import torch.distributed as dist

from megatron_mtp.data.tokenizers import build_tokenizer
from megatron_mtp.inference import check_draft_settings, greedy_generate, speculative_generate
from megatron_mtp.inference.generation import Generation, check_lengths
from megatron_mtp.training.arguments import parse_args as parse_model_args
from megatron_mtp.training.checkpointing import (
    check_saved_signature,
    load_model_weights,
    model_signature,
    saved_signature,
)
from megatron_mtp.training.setup import build_core_model, init_distributed, padded_vocab_size, transformer_config

# Signature entry -> the pretrain flag that sets it (booleans: the store_true flag meaning True).
_SIGNATURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "position_embedding_type": "--position-embedding-type",
    "max_position_embeddings": "--max-position-embeddings",
    "normalization": "--normalization",
    "swiglu": "--swiglu",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "num_experts": "--num-experts",
    "mtp_num_layers": "--mtp-num-layers",
    "mtp_mode": "--mtp-mode",
}

_TRAINING_ONLY_DEFAULTS = {"--micro-batch-size": "1", "--train-iters": "1", "--lr": "0", "--tokenizer-type": "ByteLevel"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_mtp.generate",
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag is a model flag of the pretrain script (python -m megatron_mtp.pretrain --help).",
    )
    parser.add_argument("--load", required=True, help="Checkpoint directory of the pretrain script (its latest).")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="Prompt text.")
    prompt.add_argument("--prompt-file", help="File whose contents are the prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--speculative", action="store_true", help="Draft with the MTP layers, verify with the model.")
    parser.add_argument(
        "--num-draft-tokens", type=int, default=None,
        help="Draft tokens per main-model forward (Megatron-Core's num_speculative_tokens). Default: the MTP depths.",
    )
    parser.add_argument(
        "--reuse-last-mtp-depth", action="store_true",
        help="Sequential MTP: draft more tokens than depths by running the last depth again (vLLM's choice).",
    )
    return parser


def model_arguments(load: str, model_argv: List[str]) -> argparse.Namespace:
    """The pretrain script's flags for the checkpoint under ``load``: ``model_argv`` plus the signature's values of
    the flags it lacks."""
    argv = list(model_argv)
    given = {arg.split("=")[0] for arg in model_argv if arg.startswith("--")}
    signature = saved_signature(load)
    for key, value in signature.items():
        flag = _SIGNATURE_FLAGS.get(key)
        if flag is None or flag in given or value is None:
            continue
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    if "--disable-bias-linear" not in given and signature.get("bias_linear") is False:
        argv.append("--disable-bias-linear")
    # Flags the pretrain script requires for training only; the tokenizer's vocabulary is checked by the signature.
    for flag, value in _TRAINING_ONLY_DEFAULTS.items():
        if flag not in given:
            argv += [flag, value]
    args = parse_model_args(argv)
    if args.hf_config:
        raise NotImplementedError("generation from --hf-config (DeepSeek-V3, MLA) checkpoints is not supported yet")
    if args.pipeline_model_parallel_size > 1 or args.sequence_parallel:
        raise NotImplementedError("generation runs at --pipeline-model-parallel-size 1 without --sequence-parallel")
    args.load = load
    return args


def load_model(args: argparse.Namespace, runtime, vocab_size: int):
    """The model in eval mode with the checkpoint's weights (its signature checked)."""
    model = build_core_model(args, runtime, transformer_config(args, runtime), vocab_size)
    load_model_weights(args.load, model, model_signature(args, vocab_size))
    return model.eval()


def decode(model, args, prompt: List[int], max_new_tokens: int, eod: Optional[int], vocab_size: int,
           speculative: bool, num_draft_tokens: int, reuse_last_depth: bool) -> Generation:
    """Plain or speculative greedy decoding; ``vocab_size``: the tokenizer's (padding ids are never chosen)."""
    if speculative:
        return speculative_generate(
            model, prompt, max_new_tokens, args.max_position_embeddings, vocab_size, num_draft_tokens,
            reuse_last_depth, eod,
        )
    return greedy_generate(model, prompt, max_new_tokens, args.max_position_embeddings, vocab_size, eod)


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    options, model_argv = parser.parse_known_args(argv)
    args = model_arguments(options.load, model_argv)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, args)
    num_draft_tokens = options.num_draft_tokens or args.mtp_config.num_layers
    if options.prompt_file:
        with open(options.prompt_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = options.prompt
    prompt = tokenizer.tokenize(text)
    try:  # every check that needs no model, before the processes join and the weights load
        check_saved_signature(options.load, model_signature(args, vocab_size))
        if options.speculative and not args.mtp_config.enabled:
            raise ValueError(f"--speculative drafts with MTP layers, and the checkpoint {options.load} has none")
        if options.speculative:
            check_draft_settings(args.mtp_config, num_draft_tokens, options.reuse_last_mtp_depth)
        check_lengths(prompt, options.max_new_tokens, args.max_position_embeddings)
    except ValueError as error:
        parser.error(str(error))
    runtime = init_distributed(args)
    model = load_model(args, runtime, vocab_size)
    result = decode(
        model, args, prompt, options.max_new_tokens, tokenizer.eod, tokenizer.vocab_size, options.speculative,
        num_draft_tokens, options.reuse_last_mtp_depth,
    )
    if dist.get_rank() == 0:
        stats = result.stats
        print(text + tokenizer.detokenize(result.tokens), flush=True)
        print(
            f"\n[{len(result.tokens)} tokens in {stats.seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s, "
            f"{stats.tokens_per_forward:.2f} tokens per main forward after the prefill]"
        )
        if options.speculative:
            rates = ", ".join(f"{rate:.3f}" for rate in stats.acceptance())
            print(f"[acceptance per draft position: {rates}]", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
