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

DEMO_MODEL_FLAGS = [  # examples/demo.sh's model and optimiser, which the measured models were trained with
    "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--make-vocab-size-divisible-by", "128", "--tokenizer-type", "ByteLevel", "--micro-batch-size", "8",
    "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--adam-beta2", "0.95",
]


def checkpoint_dir(runs_dir: str, mode: str, depths: int) -> str:
    return os.path.join(runs_dir, f"{mode}_d{depths}", "ckpt")


def train_command(args, mode: str, depths: int) -> List[str]:
    out = os.path.dirname(checkpoint_dir(args.runs_dir, mode, depths))
    return [
        sys.executable, "-m", "megatron_mtp.pretrain", "--num-layers", str(args.num_layers), *DEMO_MODEL_FLAGS,
        "--mtp-mode", mode, "--mtp-num-layers", str(depths), "--train-iters", str(args.train_iters), "--eval-interval", "200",
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
    vocab_size = build_tokenizer("ByteLevel", None).vocab_size
    model = load_model(model_args, runtime, padded_vocab_size(vocab_size, model_args))
    settings = [(depths, False)]
    if mode == "sequential" and depths == 1 and args.reuse_draft_tokens > depths:
        settings.append((args.reuse_draft_tokens, True))
    rows = []
    run = lambda prompt, speculative, k, reuse: decode(  # noqa: E731
        model, model_args, prompt, args.max_new_tokens, None, vocab_size, speculative, k, reuse
    )
    for speculative, k, reuse in [(False, 1, False)] + [(True, k, reuse) for k, reuse in settings]:
        run(prompts[0]["ids"], speculative, k, reuse)  # warm-up, not timed
    # Prompt by prompt, plain then speculative back to back, so that load changes on a shared machine hit both.
    plain_stats, stats = GenerationStats(), [GenerationStats() for _ in settings]
    identical = [0] * len(settings)
    for prompt in prompts:
        plain = run(prompt["ids"], False, 1, False)
        plain_stats.add(plain.stats)
        for index, (num_draft_tokens, reuse) in enumerate(settings):
            result = run(prompt["ids"], True, num_draft_tokens, reuse)
            stats[index].add(result.stats)
            identical[index] += result.tokens == plain.tokens
    for (num_draft_tokens, reuse), stat, same in zip(settings, stats, identical):
        rows.append(dict(
            model=f"{mode} D={depths}", draft_tokens=num_draft_tokens, reuse_last_depth=reuse,
            tokens_per_forward=stat.tokens_per_forward, acceptance=stat.acceptance(),
            plain_tokens_per_s=plain_stats.tokens_per_second, speculative_tokens_per_s=stat.tokens_per_second,
            speedup=stat.tokens_per_second / plain_stats.tokens_per_second, identical=f"{same}/{len(prompts)}",
        ))
        print(json.dumps(rows[-1]), flush=True)
    return rows


class MegatronCoreDrafter:
    """Megatron-Core 0.19's MTP drafting (``compute_mtp_single_step``, as its dynamic engine calls it): each depth
    runs at the last position only, attending to nothing before it, on Megatron-Core's own MTP block."""

    def __init__(self, core_model, max_sequence_length: int, vocab_size: int):
        import torch

        self.model, self.vocab_size = core_model, vocab_size
        self.states = torch.zeros(max_sequence_length, 1, core_model.config.hidden_size)

    def record_trunk(self, position, hidden):
        self.states[position : position + hidden.size(0)] = hidden

    def draft(self, tokens, last, count):
        import torch

        from megatron_mtp.inference import greedy_ids

        hidden, drafts = self.states[last - 1 : last], []
        with torch.no_grad():
            for depth in range(count):
                position = torch.tensor([[last + depth]])
                hidden, logits = self.model.compute_mtp_single_step(
                    hidden, tokens[last + depth].view(1, 1), position, depth=depth
                )
                drafts.append(int(greedy_ids(logits[0, 0], self.vocab_size)))
                tokens[last + depth + 1] = drafts[-1]
        return drafts

    def accept(self, last, accepted):
        pass


def megatron_core_attempt(runs_dir: str) -> None:
    """Under Megatron-Core 0.19: set up its MTP speculative decoding (the dynamic inference context with
    num_speculative_tokens=1) for the sequential D=1 model, and, whether or not that runs on CPU, measure the
    acceptance of its drafting method on the sequential models (Megatron-Core's GPTModel with its own MTP block,
    holding our checkpoint's weights; verification by our loop). Prints the outcome as JSON."""
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    from megatron_mtp.data.tokenizers import build_tokenizer
    from megatron_mtp.generate import load_model, model_arguments
    from megatron_mtp.inference import GenerationStats, speculative_generate
    from megatron_mtp.training.setup import init_distributed, padded_vocab_size, transformer_config

    with open(os.path.join(runs_dir, "prompts.json")) as f:
        prompts = json.load(f)
    outcome, runtime = dict(rows=[]), None
    for mode, depths in MODELS:
        if mode != "sequential":
            continue
        args = model_arguments(checkpoint_dir(runs_dir, mode, depths), [])
        runtime = runtime or init_distributed(args)
        config = transformer_config(args, runtime)
        tokens = build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size
        vocab = padded_vocab_size(tokens, args)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
        core = GPTModel(
            config, spec, vocab, args.max_position_embeddings, position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False),
        ).eval()
        ours = load_model(args, runtime, vocab)
        result = core.load_state_dict(ours.state_dict(), strict=False)
        missing = [key for key in result.missing_keys + result.unexpected_keys if not key.endswith("_extra_state")]
        if missing:
            raise RuntimeError(f"Megatron-Core's GPTModel does not take our weights: {missing[:5]}")
        if "engine_error" not in outcome:
            try:
                DynamicInferenceContext(
                    config, InferenceConfig(num_speculative_tokens=depths, max_sequence_length=args.seq_length)
                )
                outcome["engine_error"] = None
            except Exception as error:  # the error is the finding
                outcome["engine_error"] = f"{type(error).__name__}: {error}"
        stats = GenerationStats()
        for prompt in prompts:
            drafter = MegatronCoreDrafter(core, args.max_position_embeddings, tokens)
            stats.add(speculative_generate(
                ours, prompt["ids"], prompt["max_new_tokens"], args.max_position_embeddings, tokens, depths,
                drafter=drafter,
            ).stats)
        outcome["rows"].append(dict(
            model=f"{mode} D={depths}", draft_tokens=depths, tokens_per_forward=stats.tokens_per_forward,
            acceptance=stats.acceptance(),
        ))
    print(json.dumps(outcome))


def try_megatron_core(args) -> Dict:
    python = args.megatron_core_python
    if not python:
        return dict(engine_error="not attempted: give --megatron-core-python (a Megatron-Core 0.19 environment)")
    command = [python, __file__, "--megatron-core-attempt", args.runs_dir]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return dict(engine_error="the comparison itself failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1])


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
    error = megatron_core.get("engine_error")
    status = "set up on CPU" if error is None else f"cannot be set up on CPU: `{error}`"
    lines.append(f"\nMegatron-Core 0.19's MTP speculative decoding (its dynamic inference engine): {status}.")
    if megatron_core.get("rows"):
        lines += [
            "Its drafting method (`compute_mtp_single_step`: each depth at the last position only, no attention over"
            " the context), on Megatron-Core's GPTModel holding the same weights, verified by this loop:\n",
            "| model | drafts | tokens per main forward (ours) | (Megatron-Core's drafting) | acceptance (ours) |"
            " acceptance (Megatron-Core's drafting) |",
            "|---|---:|---:|---:|---|---|",
        ]
        ours = {(row["model"], row["draft_tokens"]): row for row in rows}
        for theirs in megatron_core["rows"]:
            mine = ours[(theirs["model"], theirs["draft_tokens"])]
            lines.append(
                f"| {theirs['model']} | {theirs['draft_tokens']} | {mine['tokens_per_forward']:.2f} | "
                f"{theirs['tokens_per_forward']:.2f} | {', '.join(f'{r:.2f}' for r in mine['acceptance'])} | "
                f"{', '.join(f'{r:.2f}' for r in theirs['acceptance'])} |"
            )
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
    right.set_xticks(range(1, max(len(row["acceptance"]) for row in rows) + 1))
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
    from megatron_mtp.data.tokenizers import build_tokenizer
    from megatron_mtp.generate import model_arguments
    from megatron_mtp.training.setup import init_distributed

    prompts = prompts_from(held_out_files(), args.prompts, args.prompt_tokens, build_tokenizer("ByteLevel", None))
    with open(os.path.join(args.runs_dir, "prompts.json"), "w") as f:
        json.dump([dict(prompt, max_new_tokens=args.max_new_tokens) for prompt in prompts], f)
    megatron_core = try_megatron_core(args)
    print(json.dumps(dict(megatron_core=megatron_core)), flush=True)
    runtime = init_distributed(model_arguments(checkpoint_dir(args.runs_dir, *MODELS[0]), []))
    rows = []
    for mode, depths in MODELS:
        rows += bench_model(args, mode, depths, prompts, runtime)
    table = (
        f"{len(prompts)} prompts of {args.prompt_tokens} tokens from held-out stdlib files, {args.max_new_tokens} new "
        f"tokens each, batch 1, fp32 on CPU; models: {args.num_layers} layers, {args.train_iters} steps each.\n\n"
        + markdown(rows, megatron_core, args)
    )
    print(table)
    with open(os.path.join(args.runs_dir, "bench_speculative.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.runs_dir, "bench_speculative.json"), "w") as f:
        json.dump(dict(settings=vars(args), prompts=[p["file"] for p in prompts], rows=rows,
                       megatron_core=megatron_core, time=time.time()), f, indent=1)
    plot(rows, os.path.join(args.runs_dir, "bench_speculative.png"))


if __name__ == "__main__":
    main()
