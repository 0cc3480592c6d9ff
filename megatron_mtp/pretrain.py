"""Pretrain a GPT with multi-token prediction on Megatron-Core.

One process (the embedded demo: the Python standard library's source, byte-level, on CPU):
    python -m megatron_mtp.pretrain
Several processes, e.g. TP=2 on one machine:
    torchrun --nproc-per-node 2 -m megatron_mtp.pretrain --tensor-model-parallel-size 2
Multi-node: examples/slurm/. All flags: --help.
"""

import math
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mtp.compat import batch_on_this_cp_rank, reset_moe_aux_loss_log
from megatron_mtp.data.datasets import MicroBatchIterator, build_gpt_datasets
from megatron_mtp.data.packing import as_packed_documents
from megatron_mtp.data.stdlib_corpus import prepare_stdlib_corpus
from megatron_mtp.data.tokenizers import build_tokenizer
from megatron_mtp.loss import MTPStats
from megatron_mtp.training.arguments import parse_args
from megatron_mtp.training.checkpointing import load_checkpoint, load_model_weights, model_signature, save_checkpoint
from megatron_mtp.training.metrics_log import MetricsLog, memory_gb, moe_aux_losses
from megatron_mtp.training.setup import (
    build_model,
    build_optimizer,
    init_distributed,
    padded_vocab_size,
    transformer_config,
)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    runtime = init_distributed(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, args)
    config = transformer_config(args, runtime)
    model = build_model(args, runtime, config, vocab_size)  # one DDP chunk per virtual pipeline stage
    optimizer, scheduler = build_optimizer(args, runtime, model)
    signature = model_signature(args, vocab_size)

    iteration, consumed_samples = 0, 0
    if args.load and args.finetune:
        load_model_weights(args.load, _modules(model), signature)
        _print(f"loaded model weights from {args.load}; training starts at iteration 0 (--finetune)")
    elif args.load:
        iteration, train_state = load_checkpoint(args.load, _modules(model), optimizer, scheduler, signature)
        consumed_samples = train_state["consumed_samples"]
        _print(f"resumed from {args.load} at iteration {iteration} ({consumed_samples} samples consumed)")

    data_path, train_set, valid_set = build_datasets(args, tokenizer, runtime.global_batch_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    log = MetricsLog(args.train_iters, args.tensorboard_dir, args.json_log) if dist.get_rank() == dist.get_world_size() - 1 else None
    device = torch.device(runtime.device, torch.cuda.current_device()) if runtime.device == "cuda" else torch.device("cpu")
    eod = tokenizer.eod if args.reset_attention_mask else None
    # One iterator per model chunk, as Megatron-LM's interleaved schedule reads them: each draws every micro-batch.
    train_batches = [
        device_batches(
            MicroBatchIterator(train_set, consumed_samples, args.micro_batch_size, dp_rank, runtime.data_parallel_size),
            device,
            eod,
        )
        for _ in model
    ]
    _print(
        f"training {sum(p.numel() for chunk in model for p in chunk.parameters()):,} parameters on this rank, "
        f"MTP {args.mtp_config.mode} D={args.mtp_config.num_layers}, world {dist.get_world_size()} "
        f"(TP {args.tensor_model_parallel_size}, PP {args.pipeline_model_parallel_size}"
        + (f" x {len(model)} virtual" if len(model) > 1 else "")
        + (f", CP {args.context_parallel_size}" if args.context_parallel_size > 1 else "")
        + ", "
        f"DP {runtime.data_parallel_size}), "
        f"{runtime.global_batch_size} samples x {args.seq_length} tokens per step, {_precision(runtime)}, "
        f"gradient-accumulation fusion {'on' if config.gradient_accumulation_fusion else 'off'}, data {' '.join(data_path)}"
    )

    if args.skip_train:
        if valid_set is None:
            raise ValueError(f"--skip-train validates, but --split {args.split} gives the validation split no data")
        evaluate(model, valid_set, runtime, args, device, eod, log, iteration)
        _finish(log)
        return

    if args.eval_interval and valid_set is not None and iteration == 0:  # the untrained model: the reference
        evaluate(model, valid_set, runtime, args, device, eod, log, iteration)
    last_saved = iteration if args.load and not args.finetune else None
    window_start, window_iters = time.time(), 0
    while iteration < args.train_iters:
        _set_training(model, True)
        logging_step = (iteration + 1) % args.log_interval == 0 or iteration + 1 == args.train_iters
        # Acceptance metrics cost an argmax over the logits per micro-batch: gather them on logging steps only.
        stats = MTPStats(args.mtp_config.num_layers, args.mtp_config.latent_losses) if logging_step else None
        # After a step the optimizer leaves param.grad aliasing DDP's main_grad; unset it or the next backward
        # accumulates every gradient twice.
        optimizer.zero_grad()
        reports = run_microbatches(model, train_batches, runtime, args, stats, iteration, forward_only=False)
        success, grad_norm, _ = optimizer.step()
        scheduler.step(increment=runtime.global_batch_size)
        consumed_samples += runtime.global_batch_size
        iteration += 1
        window_iters += 1
        if logging_step:
            metrics = reduce_metrics(reports, stats, device)
            writer = log.writer if log is not None else None
            metrics.update(
                moe_aux_losses(config, iteration, runtime.num_microbatches, writer, args.moe_per_layer_logging)
            )
            if runtime.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.time() - window_start
            if log is not None:
                metrics.update(
                    lr=scheduler.get_lr(optimizer.param_groups[0]),
                    grad_norm=float(grad_norm or 0.0),
                    seconds_per_iter=elapsed / window_iters,
                    tokens_per_s=window_iters * runtime.global_batch_size * args.seq_length / elapsed,
                    memory_gb=memory_gb(runtime.device),
                )
                if not success:
                    print(f"iteration {iteration}: optimizer step skipped (non-finite gradients)", flush=True)
                log.log(iteration, metrics)
            window_start, window_iters = time.time(), 0
        else:  # the logged MoE aux losses are those of the logging step, as the LM loss is
            reset_moe_aux_loss_log()
        evaluating = args.eval_interval and valid_set is not None and iteration % args.eval_interval == 0
        saving = args.save and args.save_interval and iteration % args.save_interval == 0
        if evaluating:
            evaluate(model, valid_set, runtime, args, device, eod, log, iteration)
        if saving:
            save(args, iteration, model, optimizer, scheduler, consumed_samples, signature)
            last_saved = iteration
        if evaluating or saving:  # keep throughput to training steps
            window_start, window_iters = time.time(), 0
    if args.save and last_saved != iteration:
        save(args, iteration, model, optimizer, scheduler, consumed_samples, signature)
    _finish(log)


def build_datasets(args, tokenizer, global_batch_size: int) -> Tuple[List[str], Dataset, Optional[Dataset]]:
    """(data path, train set, validation set) of a run: --data-path or the embedded corpus, sized for
    --train-iters steps and every evaluation. Collective when torch.distributed is initialized."""
    data_path = args.data_path or [prepare_stdlib_corpus(args.data_cache_path, tokenizer)]
    evaluations = (args.train_iters // args.eval_interval if args.eval_interval else 0) + 1
    eval_samples = evaluations * args.eval_iters * global_batch_size
    train_set, valid_set, _ = build_gpt_datasets(
        data_path, args.split, args.seq_length, tokenizer, args.seed,
        (args.train_iters * global_batch_size, eval_samples, 0), args.data_cache_path,
        reset_position_ids=args.reset_position_ids, eod_mask_loss=args.eod_mask_loss,
    )
    return data_path, train_set, valid_set


def _finish(log: Optional[MetricsLog]) -> None:
    if log is not None:
        log.close()
    dist.barrier()
    dist.destroy_process_group()


def device_batches(batches: Iterator[Dict], device, eod: Optional[int]) -> Iterator[Dict]:
    """The micro-batches on ``device``; with ``eod`` (--reset-attention-mask) each as packed documents that end
    after each eod (``data/packing.py``)."""
    for batch in batches:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        yield batch if eod is None else as_packed_documents(batch, eod)


def run_microbatches(model, batches: List[Iterator[Dict]], runtime, args, stats, step: int, forward_only: bool):
    """One schedule over ``runtime.num_microbatches`` micro-batches; returns the last stage's loss reports.

    ``model``: this rank's DDP chunks; ``batches``: one micro-batch iterator (``device_batches``) per chunk."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        # This context-parallel rank's two chunks of each sequence, as Megatron-LM's get_batch cuts them.
        batch = batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())
        output = model(
            batch["tokens"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            packed_seq_params=batch.get("packed_seq_params"),
            mtp_stats=stats,
            mtp_step=step,
            compute_mtp=True,
        )

        def loss_func(per_token_loss):
            mask = batch["loss_mask"].float()
            loss_sum = (per_token_loss.float() * mask).sum()
            return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack((loss_sum.detach(), mask.sum()))}

        return output, loss_func

    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
    # Packed documents travel between pipeline stages as one sequence of all the micro-batch's tokens.
    packed = args.reset_attention_mask
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches if len(batches) > 1 else batches[0],
        model=model,
        num_microbatches=runtime.num_microbatches,
        seq_length=args.seq_length * args.micro_batch_size if packed else args.seq_length,
        micro_batch_size=1 if packed else args.micro_batch_size,
        forward_only=forward_only,
    )


def reduce_metrics(reports: List[Dict], stats: MTPStats, device) -> Dict[str, float]:
    """LM loss and MTP metrics summed over micro-batches and data- and context-parallel ranks (last stage only;
    each context-parallel rank counts its own tokens)."""
    if not parallel_state.is_pipeline_last_stage():
        return {}
    totals = torch.stack([r["lm loss"] for r in reports]).sum(0).to(torch.float64).to(device)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(totals, group=group)
    stats.all_reduce(group)
    return dict(lm_loss=(totals[0] / totals[1].clamp(min=1)).item(), **stats.summary())


@torch.no_grad()
def evaluate(model, valid_set, runtime, args, device, eod: Optional[int], log, iteration: int) -> None:
    _set_training(model, False)
    batches = [
        device_batches(
            MicroBatchIterator(
                valid_set, 0, args.micro_batch_size, parallel_state.get_data_parallel_rank(), runtime.data_parallel_size
            ),
            device,
            eod,
        )
        for _ in model
    ]
    reports, stats = [], MTPStats(args.mtp_config.num_layers, args.mtp_config.latent_losses)
    for _ in range(args.eval_iters):
        reports += run_microbatches(model, batches, runtime, args, stats, iteration, forward_only=True)
    metrics = reduce_metrics(reports, stats, device)
    if log is not None:
        metrics["lm_ppl"] = math.exp(min(metrics["lm_loss"], 50.0))
        log.log(iteration, metrics, prefix="validation/")
    _set_training(model, True)


def save(args, iteration, model, optimizer, scheduler, consumed_samples, signature) -> None:
    start = time.time()
    directory = save_checkpoint(
        args.save, iteration, _modules(model), optimizer, scheduler, {"consumed_samples": consumed_samples}, signature
    )
    _print(f"saved checkpoint at iteration {iteration} to {directory} ({time.time() - start:.1f} s)")


def _modules(model: List) -> List[torch.nn.Module]:
    """The modules the DDP chunks wrap (what checkpoints hold)."""
    return [chunk.module for chunk in model]


def _set_training(model: List, mode: bool) -> None:
    for chunk in model:
        chunk.train(mode)


def _precision(runtime) -> str:
    if not runtime.bf16:
        return "fp32"
    return f"bf16 parameters, fp32 main parameters, {'fp32' if runtime.grad_reduce_in_fp32 else 'bf16'} main_grad"


def _print(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
