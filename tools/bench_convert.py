"""Benchmark DeepSeek-V3 checkpoint import/export on a synthetic fp8 checkpoint of a few GB (not a test).

    python tools/bench_convert.py --workdir /tmp/bench_convert --json bench_convert.json

Writes a random checkpoint in the released layout (per-expert fp8 e4m3 weights with 128x128 scales, layer-N MTP
tensors) for a DeepSeek-V3-shaped config scaled down to about 2 GB, then measures:
  * plain read throughput of its shards, cold (pages evicted with posix_fadvise DONTNEED, which needs no root
    and which the kernel honours for clean pages) and warm (second read, from the page cache);
  * import (HF -> torch_dist) and export (torch_dist -> HF) wall time and GB/s, each in its own process started
    with a cold page cache, and that process's peak RSS (VmHWM) next to the largest shard and the RSS of an
    idle process that only imported the converter and built the meta model.
Deletes everything it wrote unless --keep. Peak disk use is about 5x the input size.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
CONVERTER = os.path.join(REPO, "tools", "convert_deepseek_v3.py")

# DeepSeek-V3's structure (MLA with q/kv LoRA, 1 dense layer then MoE, 1 MTP layer, 8 expert groups, fp8) at a
# size that fits a laptop disk: ~2 GB of fp8/bf16 input. moe_intermediate_size 1000 leaves partial 128-blocks.
BENCH_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "moe_intermediate_size": 1000,
    "num_hidden_layers": 4,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 1,
    "n_routed_experts": 56,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 768,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(directory: str):
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def read_throughput(paths, block: int = 64 << 20) -> float:
    """GB/s of reading the files start to end in 64 MiB blocks."""
    start, total = time.perf_counter(), 0
    buffer = bytearray(block)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                count = f.readinto(buffer)
                if not count:
                    break
                total += count
    return total / GB / (time.perf_counter() - start)


def peak_rss_code(body: str) -> str:
    """Python code running ``body``, then printing this process's peak RSS (VmHWM, kB) as its last line.

    VmHWM belongs to the process's own address space: unlike ru_maxrss it does not inherit the RSS of the
    parent that forked it."""
    return (
        "import re, sys, warnings\nwarnings.filterwarnings('ignore')\n"
        f"{body}\n"
        "status = open('/proc/self/status').read()\n"
        "print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', status).group(1), flush=True)\n"
    )


def run_measured(body: str) -> dict:
    """Run ``body`` in a fresh Python process: its wall time, stdout and peak RSS in GB."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", peak_rss_code(body)], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{body} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"VmHWM (\d+)", result.stdout).group(1))
    return dict(seconds=seconds, peak_rss_gb=peak_kb * 1024 / GB, stdout=result.stdout)


def run_converter(arguments) -> dict:
    body = f"sys.argv = {[CONVERTER, *arguments]!r}\nimport runpy\n"
    body += "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as end:\n"
    body += "    if end.code:\n        raise\n"
    return run_measured(body)


def idle_rss_gb() -> float:
    """Peak RSS of a process that imports the converter and builds the meta model, converting nothing."""
    body = (
        "sys.path.insert(0, 'tools')\nfrom bench_convert import BENCH_CONFIG\n"
        "from megatron_mtp.deepseek import convert\n"
        "with convert._single_process_world():\n    convert._meta_sharded_state_dict(BENCH_CONFIG)"
    )
    return run_measured(body)["peak_rss_gb"]


def converter_seconds(stdout: str) -> float:
    """The conversion time the CLI reports (from its start, after Python and Megatron imports)."""
    return float(re.search(r" in ([\d.]+) s", stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--json", default=None, help="Write the figures here.")
    parser.add_argument("--group-gb", type=float, default=0.5, help="Import/export --group-gb.")
    parser.add_argument("--shards", type=int, default=4, help="Input shards.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints.")
    args = parser.parse_args()

    hf_dir, megatron_root, exported = (os.path.join(args.workdir, name) for name in ("hf", "megatron", "exported"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    run_measured(  # in a child process, so this one stays small
        "sys.path[:0] = ['tests', 'tools']\nfrom bench_convert import BENCH_CONFIG\n"
        "from deepseek.tiny_checkpoint import write_tiny_checkpoint\n"
        f"write_tiny_checkpoint({hf_dir!r}, BENCH_CONFIG, fp8=True, num_shards={args.shards})"
    )
    shards = sorted(p for p in files_under(hf_dir) if p.endswith(".safetensors"))
    input_bytes = sum(os.path.getsize(p) for p in shards)
    largest_shard = max(os.path.getsize(p) for p in shards)
    print(f"wrote {len(shards)} shards, {input_bytes / GB:.2f} GB, in {time.perf_counter() - start:.0f} s", flush=True)

    evict(shards)
    cold_read = read_throughput(shards)
    warm_read = read_throughput(shards)
    idle = idle_rss_gb()

    evict(shards)
    group = ["--group-gb", str(args.group_gb), "--no-progress"]
    imported = run_converter(["import", hf_dir, megatron_root, *group])
    megatron_files = files_under(megatron_root)
    megatron_bytes = sum(os.path.getsize(p) for p in megatron_files)
    if not args.keep:
        shutil.rmtree(hf_dir)
    evict(megatron_files)
    export = run_converter(["export", megatron_root, exported, *group])
    exported_bytes = sum(os.path.getsize(p) for p in files_under(exported))

    figures = {
        "input_gb": input_bytes / GB,
        "largest_shard_gb": largest_shard / GB,
        "torch_dist_gb": megatron_bytes / GB,
        "exported_gb": exported_bytes / GB,
        "plain_read_cold_gb_s": cold_read,
        "plain_read_warm_gb_s": warm_read,
        "import_seconds": converter_seconds(imported["stdout"]),
        "import_process_seconds": imported["seconds"],
        "import_gb_s": input_bytes / GB / converter_seconds(imported["stdout"]),
        "import_peak_rss_gb": imported["peak_rss_gb"],
        "export_seconds": converter_seconds(export["stdout"]),
        "export_gb_s": megatron_bytes / GB / converter_seconds(export["stdout"]),
        "export_peak_rss_gb": export["peak_rss_gb"],
        "idle_converter_rss_gb": idle,
        "group_gb": args.group_gb,
        "cpus": os.cpu_count(),
    }
    for name, value in figures.items():
        print(f"{name:<26} {value:10.3f}" if isinstance(value, float) else f"{name:<26} {value:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
