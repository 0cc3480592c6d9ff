"""Self-speculative decoding with MTP drafts against plain KV-cached greedy decoding, on CPU at batch 1.

Trains (unless their checkpoints exist) three demo models on the embedded stdlib corpus with the same architecture
and step budget: sequential D=1, sequential D=3, parallel heads D=3. Then decodes prompts cut from held-out stdlib
files (documents outside the training split) with plain greedy decoding and with speculation, checks the tokens are
identical, and reports tokens per main forward, acceptance per draft position and the wall-clock speedup as a
markdown table, JSON and a PNG. Megatron-Core 0.19's own MTP speculative decoding is tried on the sequential D=1
model in a subprocess under that release; where it cannot run on CPU the error is reported.

    python tools/bench_speculative.py --runs-dir runs/spec
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

MODELS = (("sequential", 1), ("sequential", 3), ("parallel", 3))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/spec")
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--train-iters", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=12, help="Held-out files to prompt from.")
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--reuse-draft-tokens", type=int, default=2,
        help="Also decode the sequential D=1 model with this many drafts by reusing its depth (0: skip).",
    )
    parser.add_argument("--megatron-core-python", default=None, help="Python of a Megatron-Core 0.19 environment.")
    parser.add_argument("--megatron-core-attempt", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def checkpoint_dir(runs_dir: str, mode: str, depths: int) -> str:
    return os.path.join(runs_dir, f"{mode}_d{depths}", "ckpt")


def train_command(args, mode: str, depths: int) -> List[str]:
    out = os.path.dirname(checkpoint_dir(args.runs_dir, mode, depths))
    return [
        sys.executable, "-m", "megatron_mtp.pretrain", "--num-layers", str(args.num_layers), "--mtp-mode", mode,
        "--mtp-num-layers", str(depths), "--train-iters", str(args.train_iters), "--eval-interval", "200",
        "--eval-iters", "2", "--log-interval", "20", "--save", os.path.join(out, "ckpt"), "--save-interval", "100",
        "--json-log", os.path.join(out, "metrics.jsonl"),
    ]


def held_out_files() -> List[str]:
    """Stdlib files after the training split of the demo's default --split 969,30,1 (documents in file order)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megatron_mtp.data.stdlib_corpus import stdlib_source_files

    files = stdlib_source_files()
    train_bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split("969,30,1"))[0]
    return files[round(train_bounds[1] * len(files)) :]


def prompts_from(files: List[str], count: int, tokens: int, tokenizer) -> List[Dict]:
    """The first ``tokens`` tokens of ``count`` files spread over ``files`` (skipping ones too short)."""
    chosen = []
    for path in files[:: max(1, len(files) // (count * 2))]:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer.tokenize(f.read())
        if len(ids) >= tokens:
            chosen.append(dict(file=path, ids=ids[:tokens]))
        if len(chosen) == count:
            break
    return chosen


def bench_model(args, mode: str, depths: int, prompts: List[Dict], runtime) -> List[Dict]:
    from megatron_mtp.data.tokenizers import build_tokenizer
    from megatron_mtp.generate import decode, load_model, model_arguments
    from megatron_mtp.inference import GenerationStats
    from megatron_mtp.training.setup import padded_vocab_size

    model_args = model_arguments(checkpoint_dir(args.runs_dir, mode, depths), [])
    vocab_size = padded_vocab_size(build_tokenizer("ByteLevel", None).vocab_size, model_args)
    model = load_model(model_args, runtime, vocab_size)
    settings = [(depths, False)]
    if mode == "sequential" and depths == 1 and args.reuse_draft_tokens > depths:
        settings.append((args.reuse_draft_tokens, True))
    rows = []
    run = lambda prompt, speculative, k, reuse: decode(  # noqa: E731
        model, model_args, prompt, args.max_new_tokens, None, vocab_size, speculative, k, reuse
    )
    run(prompts[0]["ids"], False, 1, False)  # warm-up, not timed
    plain_stats, plain_tokens = GenerationStats(), []
    for prompt in prompts:
        result = run(prompt["ids"], False, 1, False)
        plain_stats.add(result.stats)
        plain_tokens.append(result.tokens)
    for num_draft_tokens, reuse in settings:
        run(prompts[0]["ids"], True, num_draft_tokens, reuse)
        stats, identical = GenerationStats(), 0
        for prompt, reference in zip(prompts, plain_tokens):
            result = run(prompt["ids"], True, num_draft_tokens, reuse)
            stats.add(result.stats)
            identical += result.tokens == reference
        rows.append(dict(
            model=f"{mode} D={depths}", draft_tokens=num_draft_tokens, reuse_last_depth=reuse,
            tokens_per_forward=stats.tokens_per_forward, acceptance=stats.acceptance(),
            plain_tokens_per_s=plain_stats.tokens_per_second, speculative_tokens_per_s=stats.tokens_per_second,
            speedup=stats.tokens_per_second / plain_stats.tokens_per_second,
            identical=f"{identical}/{len(prompts)}",
        ))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def megatron_core_attempt(checkpoint: str) -> None:
    """Under Megatron-Core 0.19: build its GPTModel with its own MTP block for the checkpoint and set up its MTP
    speculative decoding (dynamic inference context, num_speculative_tokens=1). Prints the outcome as JSON."""
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    from megatron_mtp.generate import model_arguments
    from megatron_mtp.training.setup import init_distributed, padded_vocab_size, transformer_config
    from megatron_mtp.data.tokenizers import build_tokenizer

    args = model_arguments(checkpoint, [])
    runtime = init_distributed(args)
    config = transformer_config(args, runtime)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    vocab = padded_vocab_size(build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size, args)
    GPTModel(  # Megatron-Core's own MTP model for this checkpoint builds on CPU; its inference context is next
        config, spec, vocab, args.max_position_embeddings, position_embedding_type=args.position_embedding_type,
        mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False),
    )
    try:
        DynamicInferenceContext(
            config, InferenceConfig(num_speculative_tokens=1, max_sequence_length=args.max_position_embeddings)
        )
        print(json.dumps(dict(ran=True)))
    except Exception as error:  # the outcome is the report
        print(json.dumps(dict(ran=False, error=f"{type(error).__name__}: {error}")))


def try_megatron_core(args) -> Dict:
    python = args.megatron_core_python
    if not python:
        return dict(ran=False, error="not attempted: give --megatron-core-python (a Megatron-Core 0.19 environment)")
    command = [python, __file__, "--megatron-core-attempt", checkpoint_dir(args.runs_dir, "sequential", 1)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": "29611"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return dict(ran=False, error=(done.stderr.strip().splitlines() or ["no output"])[-1])


def markdown(rows: List[Dict], megatron_core: Dict, args) -> str:
    lines = [
        "| model | drafts | tokens per main forward | acceptance per draft position | plain tok/s | speculative tok/s"
        " | speedup | identical to greedy |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        drafts = f"{row['draft_tokens']}{' (reused depth)' if row['reuse_last_depth'] else ''}"
        acceptance = ", ".join(f"{rate:.2f}" for rate in row["acceptance"])
        lines.append(
            f"| {row['model']} | {drafts} | {row['tokens_per_forward']:.2f} | {acceptance} | "
            f"{row['plain_tokens_per_s']:.1f} | {row['speculative_tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['identical']} |"
        )
    status = "ran" if megatron_core.get("ran") else f"did not run on CPU: `{megatron_core.get('error')}`"
    lines.append(f"\nMegatron-Core 0.19 MTP speculative decoding (sequential D=1): {status}")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']}\n{r['draft_tokens']} drafts" for r in rows]
    left.bar(labels, [r["tokens_per_forward"] for r in rows], label="tokens per main forward")
    left.bar(labels, [r["speedup"] for r in rows], width=0.4, label="wall-clock speedup")
    left.axhline(1.0, color="gray", linewidth=0.8)
    left.legend()
    for row, label in zip(rows, labels):
        right.plot(range(1, len(row["acceptance"]) + 1), row["acceptance"], marker="o", label=label.replace("\n", ", "))
    right.set_xlabel("draft position")
    right.set_ylabel("accepted (fraction of rounds)")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.megatron_core_attempt:
        return megatron_core_attempt(args.megatron_core_attempt)
    for mode, depths in MODELS:
        if not os.path.isdir(checkpoint_dir(args.runs_dir, mode, depths)):
            subprocess.run(train_command(args, mode, depths), check=True)
    megatron_core = try_megatron_core(args)
    from megatron_mtp.data.tokenizers import build_tokenizer
    from megatron_mtp.generate import model_arguments
    from megatron_mtp.training.setup import init_distributed

    runtime = init_distributed(model_arguments(checkpoint_dir(args.runs_dir, *MODELS[0]), []))
    tokenizer = build_tokenizer("ByteLevel", None)
    prompts = prompts_from(held_out_files(), args.prompts, args.prompt_tokens, tokenizer)
    rows = []
    for mode, depths in MODELS:
        rows += bench_model(args, mode, depths, prompts, runtime)
    table = markdown(rows, megatron_core, args)
    print(table)
    with open(os.path.join(args.runs_dir, "bench_speculative.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.runs_dir, "bench_speculative.json"), "w") as f:
        json.dump(dict(settings=vars(args), prompts=[p["file"] for p in prompts], rows=rows,
                       megatron_core=megatron_core, time=time.time()), f, indent=1)
    plot(rows, os.path.join(args.runs_dir, "bench_speculative.png"))


if __name__ == "__main__":
    main()
