"""Convert DeepSeek-V3 checkpoints between Hugging Face safetensors and Megatron-Core torch_dist.

    python tools/convert_deepseek_v3.py import /models/DeepSeek-V3 /checkpoints/dsv3
    python tools/convert_deepseek_v3.py export /checkpoints/dsv3-trained /models/DeepSeek-V3-trained \
        --hf-config /models/DeepSeek-V3/config.json

import: a HF directory (config.json, model.safetensors.index.json, shards; fp8 e4m3 with weight_scale_inv or
bf16) -> ROOT/iter_0000000 + latest_checkpointed_iteration.txt, loadable by the pretrain script at any TP/PP/EP
with --hf-config and --finetune. fp8 weights are dequantized to bf16. Tensors stream one at a time; every tensor
must be used exactly once (leftovers are an error naming them); the MTP layer's embed_tokens / shared_head.head
copies are checked against the main ones (a difference only warns).
export: a torch_dist checkpoint made by import, or saved by the pretrain script (then pass --hf-config) -> bf16
safetensors shards (streamed; --shard-gb each), index and config.json, with the MTP layer's embed_tokens /
shared_head.head copies that vLLM and SGLang read.
"""

import argparse
import sys
import time
import warnings

from megatron_mtp.deepseek.convert import export_hf_checkpoint, import_hf_checkpoint
from megatron_mtp.deepseek.hf_checkpoint import CheckpointError
from megatron_mtp.deepseek.safetensors_io import SafetensorsFormatError

GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("import", help="Hugging Face directory -> Megatron torch_dist checkpoint")
    to_megatron.add_argument("hf_dir", help="HF checkpoint directory (config.json, index, safetensors shards).")
    to_megatron.add_argument("output", help="Checkpoint root to create (iter_0000000 and the tracker file).")
    to_megatron.add_argument(
        "--group-gb",
        type=float,
        default=0.5,
        help="GB of tensors (bf16) per torch_dist write; one group is written while the next is read, so peak "
        "memory is about twice this.",
    )
    to_hf = commands.add_parser("export", help="Megatron torch_dist checkpoint -> Hugging Face safetensors")
    to_hf.add_argument("checkpoint", help="Checkpoint root (its latest iteration is exported).")
    to_hf.add_argument("output", help="Directory for the safetensors shards, index and config.json.")
    to_hf.add_argument(
        "--hf-config",
        default=None,
        help="The model's HF config.json; needed for a checkpoint the pretrain script saved (an imported one "
        "records its own).",
    )
    to_hf.add_argument("--shard-gb", type=float, default=5.0, help="Largest safetensors shard.")
    to_hf.add_argument("--group-gb", type=float, default=1.0, help="Tensors read per torch_dist load (float32).")
    for command in (to_megatron, to_hf):
        command.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            if args.command == "import":
                report = import_hf_checkpoint(
                    args.hf_dir, args.output, int(args.group_gb * GIB), progress=not args.no_progress
                )
                seconds = time.time() - start
                print(
                    f"imported {report.tensors} tensors ({report.input_bytes / GIB:.2f} GiB) into "
                    f"{report.checkpoint_dir} in {seconds:.1f} s ({report.input_bytes / GIB / seconds:.2f} GiB/s)"
                )
            else:
                files = export_hf_checkpoint(
                    args.checkpoint,
                    args.output,
                    int(args.shard_gb * GIB),
                    int(args.group_gb * GIB),
                    progress=not args.no_progress,
                    hf_config=args.hf_config,
                )
                print(f"exported {len(files)} shards to {args.output} in {time.time() - start:.1f} s")
        except (CheckpointError, SafetensorsFormatError, FileExistsError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
