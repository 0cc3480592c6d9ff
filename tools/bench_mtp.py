"""Side-by-side benchmark: no MTP, Megatron-Core's MTP, and ours (sequential plain / chunked, parallel heads; with
the main next-token loss chunked too, with and without MTP: the ``-chunked-main`` cases, by default (16-bit
logits kept from forward, fp32 ones recomputed) and with the logits recomputed in backward; the others keep
GPTModel's; ``none-plain-main`` is our model without MTP and with GPTModel's main loss).

Every (vocab, D, implementation) case runs in a fresh process, so its peak memory is its own: the peak of the
bytes allocated, ``torch.cuda.max_memory_allocated`` on GPU and the same reckoning on CPU (the model's storages
plus a profiled step's peak; see ``_cpu_peak_allocated_mb``). A step is one forward + backward of a GPT with
MTP on random tokens (no optimizer). Cases are interleaved (rounds run the cases in rotated order) so a
machine that slows down does not favour one implementation. Reports the median step time after warm-up and
the peak memory added over the no-MTP model of the same vocabulary, as a markdown table, JSON and a PNG.

The floor: Megatron-Core's MTP at a tiny vocabulary (``--floor-vocab``) adds what both implementations need
alike (the MTP transformer layers' parameters, gradients and activations) and next to nothing for logits;
the table reports each case's added memory above that floor against Megatron-Core's.

``--megatron-ddp`` wraps the model in Megatron's DistributedDataParallel (fp32 ``main_grad`` buffers, as
Megatron trains) and ``--gradient-accumulation-fusion`` turns on Megatron-LM's GPU default, where weight
gradients go straight into ``main_grad`` (on CPU through the bridge's stand-in for apex's kernel). ``--bf16``
trains as Megatron-LM's ``--bf16`` does: bf16 parameters under ``Float16Module``, fp32 ``main_grad``.
``--attention sdpa`` runs every layer's core attention on ``scaled_dot_product_attention`` with a causal flag
(flash attention on GPU and on CPU: no ``[b, heads, s, s]`` scores kept), standing in for TransformerEngine's
fused attention that GPU runs use; ``local`` is Megatron-Core's unfused ``DotProductAttention``.

    python tools/bench_mtp.py                       # CPU: hidden 256, 4 layers, seq 256, batch 4
    python tools/bench_mtp.py --depths 1 --vocab-sizes 32000 --steps 2   # a quick look
    python tools/bench_mtp.py --megatron-ddp --gradient-accumulation-fusion --hidden-size 1024 \
        --seq-length 512 --micro-batch-size 1 --vocab-sizes 32000 --depths 1 2
    python tools/bench_mtp.py --megatron-ddp --gradient-accumulation-fusion --bf16 --attention sdpa ...
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

CASES = {
    "none": "no MTP (GPTModel)",
    "megatron": "Megatron-Core MTP",
    "seq-plain": "ours, sequential, plain loss",
    "seq-chunked": "ours, sequential, chunked loss",
    "seq-chunked-recompute": "ours, sequential, chunked loss, logits recomputed in backward",
    "seq-chunked-kept": "ours, sequential, chunked loss, gradients kept from forward",
    "parallel": "ours, parallel heads, chunked loss",
    "none-plain-main": "ours, no MTP, GPTModel's main loss",
    "none-chunked-main": "ours, no MTP, chunked main loss",
    "none-chunked-main-recompute": "ours, no MTP, chunked main loss, logits recomputed",
    "seq-chunked-main": "ours, sequential, chunked loss, chunked main loss",
    "seq-chunked-main-recompute": "ours, sequential, chunked loss, chunked main loss, logits recomputed",
}
# Measured once per vocabulary, at D=0.
NO_MTP_CASES = ("none", "none-plain-main", "none-chunked-main", "none-chunked-main-recompute")
"""Our cases other than the ``-chunked-main`` ones keep GPTModel's output layer and loss for the main next-token
loss. ``none-plain-main`` is our model without MTP (what our MTP cases add to, e.g. with the fused word-embedding
lookup): each MTP case's "own addition" is over its own implementation's no-MTP case of the same main loss."""


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        print("RESULT " + json.dumps(_measure(json.loads(args.child))), flush=True)
        return
    os.makedirs(args.output_dir, exist_ok=True)
    if args.gradient_accumulation_fusion and not args.megatron_ddp:
        raise SystemExit("--gradient-accumulation-fusion needs --megatron-ddp (main_grad comes from Megatron's DDP)")
    if args.bf16 and not args.megatron_ddp:
        raise SystemExit("--bf16 needs --megatron-ddp (the fp32 main_grad of bf16 training comes from Megatron's DDP)")
    no_mtp = ["none"] + [case for case in args.cases if case in NO_MTP_CASES and case != "none"]  # "none": the base
    jobs = [(vocab, 0, case) for vocab in args.vocab_sizes for case in no_mtp]
    if args.floor_vocab:
        jobs += [(args.floor_vocab, 0, "none")] + [(args.floor_vocab, depth, "megatron") for depth in args.depths]
    jobs += [
        (vocab, depth, case)
        for vocab in args.vocab_sizes
        for depth in args.depths
        for case in args.cases
        if case not in NO_MTP_CASES
    ]
    samples = {}
    for round_index in range(args.rounds):
        shift = round_index * len(jobs) // max(args.rounds, 1)
        for vocab, depth, case in jobs[shift:] + jobs[:shift]:
            settings = dict(vars(args), vocab=vocab, depth=depth, case=case, child=None)
            result = _run_child(settings)
            samples.setdefault((vocab, depth, case), []).append(result)
            print(
                f"  round {round_index + 1}/{args.rounds}  V={vocab:>6}  D={depth}  {case:<22} "
                f"step {result['step_s']:.3f} s  peak {result['peak_mb']:.0f} MB",
                flush=True,
            )
    rows = _summarise(samples, args)
    table = _markdown(rows, args)
    print(table)
    with open(os.path.join(args.output_dir, "bench_mtp.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "bench_mtp.json"), "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows}, f, indent=1)
    _plot([r for r in rows if r["vocab"] != args.floor_vocab], os.path.join(args.output_dir, "bench_mtp.png"))
    print(f"wrote {args.output_dir}/bench_mtp.md, .json, .png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk of the chunked loss")
    parser.add_argument(
        "--floor-vocab", type=int, default=256,
        help="vocabulary of the floor measurement (Megatron-Core's MTP, logits negligible); 0: none",
    )
    parser.add_argument("--megatron-ddp", action="store_true", help="wrap in Megatron DDP (fp32 main_grad)")
    parser.add_argument(
        "--gradient-accumulation-fusion", action="store_true",
        help="weight gradients straight into main_grad (needs --megatron-ddp; CPU: the bridge's kernel stand-in)",
    )
    parser.add_argument(
        "--bf16", action="store_true",
        help="bf16 parameters under Float16Module with fp32 main_grad, as Megatron-LM's --bf16 (needs --megatron-ddp)",
    )
    parser.add_argument(
        "--attention", choices=["local", "sdpa"], default="local",
        help="core attention: Megatron-Core's unfused DotProductAttention, or scaled_dot_product_attention with a "
        "causal flag (flash attention, no [b, heads, s, s] scores; stands in for TransformerEngine's fused attention)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per case, interleaved")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output-dir", default="runs/bench_mtp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def _run_child(settings: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"case {settings['case']} V={settings['vocab']} D={settings['depth']} failed:\n{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def _measure(settings: dict) -> dict:
    """In a fresh process: build one case, run warm-up + timed steps, return step times and peak memory."""
    warnings.filterwarnings("ignore")
    import torch

    device = settings["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, batch, mask = _build(settings, device)

    def step():
        if settings["megatron_ddp"]:
            model.zero_grad_buffer()
        for param in model.parameters():
            param.grad = None
        loss = model(**batch)
        ((loss * mask).sum() / mask.sum()).backward()

    if device == "cpu" and settings["warmup"] < 1:
        raise SystemExit("on CPU the first warm-up step measures the memory: --warmup must be at least 1")
    times, peak_mb = [], None
    for index in range(settings["warmup"] + settings["steps"]):
        if device == "cpu" and index == 0:
            peak_mb = _cpu_peak_allocated_mb(model, step)
            continue
        if index == settings["warmup"] and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= settings["warmup"]:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return dict(step_s=statistics.median(times), step_times=times, peak_mb=peak_mb, peak_rss_mb=rss_mb, device=device)


def _cpu_peak_allocated_mb(model, step) -> float:
    """On CPU, what ``torch.cuda.max_memory_allocated`` reports on GPU for a step: the storages the model holds
    between steps (parameters, buffers, Megatron DDP's gradient buffers) plus the peak of what the step (the first
    warm-up step, run here; one-time buffers count once) allocates on top, from the profiler's account of the CPU
    allocator. Not the RSS: untouched ``torch.empty`` pages and the model's initialisation would count there, and
    freed heap need not go back to the system."""
    import torch

    held = {}
    for tensor in [*model.parameters(), *torch.nn.Module.buffers(model)]:  # DDP names its grad buffers "buffers"
        for kept in (tensor, getattr(tensor, "main_grad", None)):
            if kept is not None:
                held[kept.untyped_storage().data_ptr()] = kept.untyped_storage().nbytes()
    return (sum(held.values()) + cpu_peak_new_bytes(step)) / 2**20


def cpu_peak_new_bytes(run) -> int:
    """The peak of the bytes allocated on CPU while ``run()`` runs, above what was allocated before it (the PyTorch
    profiler's account of the CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in changes:  # + allocated, - freed
        live += nbytes
        peak = max(peak, live)
    return peak


def _build(settings: dict, device: str):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mtp import cpu_bridge
    from megatron_mtp.config import MTPConfig
    from megatron_mtp.layers import get_mtp_block_spec
    from megatron_mtp.model import MTPGPTModel
    from megatron_mtp.training.setup import free_port

    if device == "cpu":
        cpu_bridge.enable()
        torch.set_num_threads(os.cpu_count())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    if device == "cpu":
        cpu_bridge.manual_seed(1234)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.cuda.set_device(0)
        model_parallel_cuda_manual_seed(1234)

    case, depth = settings["case"], settings["depth"]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=settings["bf16"])
    mtp = None
    if case not in ("none", "megatron"):
        mtp = MTPConfig(
            num_layers=depth,
            mode="parallel" if case == "parallel" else "sequential",
            loss_implementation="plain" if case == "seq-plain" else "chunked",
            loss_chunk_size=settings["chunk_size"],
            loss_recompute_logits={"seq-chunked-recompute": True, "seq-chunked-kept": False}.get(case),
            main_loss_implementation="chunked" if "chunked-main" in case else "plain",
            main_loss_recompute_logits=True if case.endswith("chunked-main-recompute") else None,
            ddp_overlaps_grad_reduce=ddp_config.overlap_grad_reduce,
        )
    hidden = settings["hidden_size"]
    config = TransformerConfig(
        num_layers=settings["num_layers"],
        hidden_size=hidden,
        ffn_hidden_size=4 * hidden,
        num_attention_heads=max(hidden // 64, 1),
        normalization="RMSNorm",
        use_cpu_initialization=device == "cpu",
        bf16=settings["bf16"],
        params_dtype=torch.bfloat16 if settings["bf16"] else torch.float32,
        gradient_accumulation_fusion=settings["gradient_accumulation_fusion"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mtp_num_layers=depth if case == "megatron" else (mtp.megatron_mtp_num_layers if mtp else None),
    )
    spec = get_gpt_layer_local_spec()
    if settings["attention"] == "sdpa":
        spec = cpu_bridge.with_packed_attention(spec)  # SDPA core attention; it takes packed batches too
    common = dict(position_embedding_type="rope")
    vocab, seq = settings["vocab"], settings["seq_length"]
    if mtp is None:
        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False) if case == "megatron" else None
        model = GPTModel(config, spec, vocab, seq, mtp_block_spec=mtp_spec, **common)
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))
    else:
        model = MTPGPTModel(
            config, spec, vocab, seq, mtp_config=mtp,
            mtp_block_spec=get_mtp_block_spec(spec, mtp) if mtp.enabled else None, **common
        )
    model = model.to(device)
    if settings["bf16"]:
        model = Float16Module(config, model)
    if settings["megatron_ddp"]:
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (settings["micro_batch_size"], seq + 1), generator=generator).to(device)
    mask = torch.ones(settings["micro_batch_size"], seq, device=device)
    batch = dict(
        input_ids=tokens[:, :-1].contiguous(),
        position_ids=torch.arange(seq, device=device).expand_as(mask).contiguous(),
        # SDPA: no mask tensor, so the causal flag picks flash attention
        attention_mask=None if settings["attention"] == "sdpa"
        else torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(1),
        labels=tokens[:, 1:].contiguous(),
        loss_mask=mask,
    )
    return model, batch, mask


def _summarise(samples: dict, args) -> list:
    rows = []
    for (vocab, depth, case), results in samples.items():
        rows.append(
            dict(
                vocab=vocab,
                depth=depth,
                case=case,
                device=results[0]["device"],
                step_s=statistics.median(t for r in results for t in r["step_times"]),
                peak_mb=statistics.median(r["peak_mb"] for r in results),
            )
        )
    base = {r["vocab"]: r for r in rows if r["case"] == "none"}
    megatron = {(r["vocab"], r["depth"]): r for r in rows if r["case"] == "megatron"}
    for row in rows:
        row["added_mb"] = row["peak_mb"] - base[row["vocab"]]["peak_mb"] if row["vocab"] in base else None
    floor = {r["depth"]: r["added_mb"] for r in rows if r["vocab"] == args.floor_vocab and r["case"] == "megatron"}
    for row in rows:
        reference = megatron.get((row["vocab"], row["depth"]))
        if reference and row["case"] != "none":
            row["time_vs_megatron"] = row["step_s"] / reference["step_s"]
            if row["added_mb"] is not None and reference["added_mb"]:
                row["added_vs_megatron"] = row["added_mb"] / reference["added_mb"]
            floor_mb = floor.get(row["depth"]) if row["vocab"] != args.floor_vocab else None
            if floor_mb is not None and row["added_mb"] is not None and reference["added_mb"] > floor_mb:
                row["floor_mb"] = floor_mb
                row["above_floor_vs_megatron"] = (row["added_mb"] - floor_mb) / (reference["added_mb"] - floor_mb)
    own_base = {(r["vocab"], r["case"]): r for r in rows if r["case"] in NO_MTP_CASES}
    for row in rows:
        case = row["case"]
        base_case = "none" if case in ("none", "megatron") else (
            "none-" + case[case.find("chunked-main"):] if "chunked-main" in case else "none-plain-main"
        )
        own = own_base.get((row["vocab"], base_case))
        if row["depth"] and own:
            row["own_added_mb"] = row["peak_mb"] - own["peak_mb"]
    for row in rows:
        reference = megatron.get((row["vocab"], row["depth"]))
        if reference and row.get("own_added_mb") is not None and reference.get("own_added_mb"):
            row["own_added_vs_megatron"] = row["own_added_mb"] / reference["own_added_mb"]
    rows.sort(key=lambda r: (r["vocab"], r["depth"], list(CASES).index(r["case"])))
    return rows


def _markdown(rows: list, args) -> str:
    device = rows[0]["device"] if rows else "?"
    ddp = "Megatron DDP" if args.megatron_ddp else "no DDP"
    lines = [
        f"hidden {args.hidden_size}, {args.num_layers} layers, seq {args.seq_length}, batch {args.micro_batch_size}, "
        f"{'bf16' if args.bf16 else 'fp32'}, {args.attention} attention, {ddp}, "
        f"gradient-accumulation fusion {'on' if args.gradient_accumulation_fusion else 'off'}, "
        f"device {device}, chunk {args.chunk_size}; median of {args.steps} steps x {args.rounds} round(s) after "
        f"{args.warmup} warm-up; memory = peak allocated bytes of a fresh process (what is held plus a step's peak). "
        + (f"Floor: what Megatron-Core's MTP adds at vocab {args.floor_vocab} (its MTP layers, next to no logits). "
           if args.floor_vocab else "")
        + "Own addition: the peak over the same implementation without MTP and with the same main loss (Megatron-Core: "
        "GPTModel; ours: our model with GPTModel's or the chunked main loss).",
        "",
        "| vocab | D | implementation | step (s) | time vs Megatron | peak (MB) | added over no MTP (MB) "
        "| added vs Megatron | floor (MB) | added above floor vs Megatron | own addition (MB) "
        "| own addition vs Megatron |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        optional = " | ".join(_format(r, key, pattern) for key, pattern in _OPTIONAL_COLUMNS[1:])
        lines.append(
            f"| {r['vocab']} | {r['depth']} | {CASES[r['case']]} | {r['step_s']:.3f} "
            f"| {_format(r, *_OPTIONAL_COLUMNS[0])} | {r['peak_mb']:.0f} | {optional} |"
        )
    return "\n".join(lines) + "\n"


_OPTIONAL_COLUMNS = (
    ("time_vs_megatron", "{:.2f}x"),
    ("added_mb", "{:.0f}"),
    ("added_vs_megatron", "{:.2f}x"),
    ("floor_mb", "{:.0f}"),
    ("above_floor_vs_megatron", "{:.2f}x"),
    ("own_added_mb", "{:.0f}"),
    ("own_added_vs_megatron", "{:.2f}x"),
)


def _format(row: dict, key: str, pattern: str) -> str:
    return pattern.format(row[key]) if row.get(key) is not None else "-"


def _plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["vocab"] for r in rows})
    cases = [c for c in CASES if c not in NO_MTP_CASES and any(r["case"] == c for r in rows)]
    figure, axes = plt.subplots(2, len(vocabs), figsize=(6 * len(vocabs), 7), squeeze=False)
    for column, vocab in enumerate(vocabs):
        depths = sorted({r["depth"] for r in rows if r["vocab"] == vocab and r["case"] not in NO_MTP_CASES})
        width = 0.8 / max(len(cases), 1)
        for index, case in enumerate(cases):
            by_depth = {r["depth"]: r for r in rows if r["vocab"] == vocab and r["case"] == case}
            positions = [d + (index - len(cases) / 2 + 0.5) * width for d in range(len(depths))]
            axes[0][column].bar(positions, [by_depth[d]["added_mb"] or 0 for d in depths], width, label=CASES[case])
            axes[1][column].bar(positions, [by_depth[d]["step_s"] for d in depths], width, label=CASES[case])
        for row, label in enumerate(("peak memory added over no MTP (MB)", "step time (s)")):
            axes[row][column].set_xticks(range(len(depths)), [f"D={d}" for d in depths])
            axes[row][column].set_ylabel(label)
            axes[row][column].set_title(f"vocab {vocab}")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
