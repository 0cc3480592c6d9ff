"""Training metrics to a person (one step line), TensorBoard scalars and JSON lines."""

import json
import os
from typing import Dict, List, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mtp.compat import report_moe_aux_losses

SCALAR_NAMES = {"lm_loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm", "tokens_per_s": "throughput/tokens-per-s"}
MOE_BALANCING_LOSS_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}
"""Megatron-Core's log name of each load-balancing loss type."""
MOE_AUX_LOSS_NAMES = (*MOE_BALANCING_LOSS_NAMES.values(), "z_loss")


def memory_gb(device: str) -> float:
    """Peak GPU memory allocated, or this process's resident memory on CPU, in GB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def moe_aux_loss_names(config: TransformerConfig) -> List[str]:
    """Megatron-Core's log names of the MoE aux losses ``config`` turns on (coefficient set)."""
    if not config.num_moe_experts:
        return []
    balancing, coefficients = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    if isinstance(balancing, str):
        balancing, coefficients = [balancing], [coefficients]
    names = [
        MOE_BALANCING_LOSS_NAMES[kind]
        for kind, coefficient in zip(balancing, coefficients)
        if kind in MOE_BALANCING_LOSS_NAMES and coefficient
    ]
    return names + ["z_loss"] if config.moe_z_loss_coeff is not None else names


def moe_aux_losses(
    config: TransformerConfig, iteration: int, num_microbatches: int, writer=None, per_layer_logging: bool = False
) -> Dict[str, float]:
    """This step's MoE aux losses (those with a coefficient set), logged as Megatron-LM logs them.

    Collective: every rank calls it after the step's micro-batches. Megatron-Core's reporter sums its per-layer
    log over pipeline stages, averages it over data-parallel ranks and micro-batches, writes ``{name}`` (mean over
    MoE layers, MTP layers included) and with ``per_layer_logging`` ``moe/{name}_layer_{i}`` to ``writer``, and
    clears the log. Returns ``{name: mean}`` for the step line and JSON ({} without MoE)."""
    names = moe_aux_loss_names(config)
    if not names:
        return {}
    means = {}
    report_moe_aux_losses(
        loss_scale=1 / num_microbatches,
        iteration=iteration,
        track_names=names,
        num_layers=config.num_layers,
        moe_layer_freq=config.moe_layer_freq,
        mtp_num_layers=config.mtp_num_layers,
        writer=writer,
        per_layer_logging=per_layer_logging,
        total_loss_dict=means,
    )
    return {name: float(value) for name, value in means.items()}


class MetricsLog:
    """Used on the logging rank only (the last rank, which holds the loss)."""

    def __init__(self, train_iters: int, tensorboard_dir: Optional[str] = None, json_path: Optional[str] = None):
        self.train_iters = train_iters
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.json_path = json_path
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)

    def log(self, iteration: int, metrics: Dict[str, float], prefix: str = "") -> None:
        print(self.format_line(iteration, metrics, prefix), flush=True)
        if self.writer is not None:
            for name, value in metrics.items():
                if name in MOE_AUX_LOSS_NAMES:  # Megatron-Core's reporter wrote them (moe_aux_losses)
                    continue
                tag = SCALAR_NAMES.get(name, name.replace("_", " ", 1) if name.startswith("mtp_") else name)
                self.writer.add_scalar(f"{prefix}{tag}", value, iteration)
            self.writer.flush()
        if self.json_path:
            with open(self.json_path, "a") as f:
                f.write(json.dumps({"iteration": iteration, "split": prefix.rstrip("/") or "train", **metrics}) + "\n")

    def format_line(self, iteration: int, metrics: Dict[str, float], prefix: str = "") -> str:
        head = f"validation at iteration {iteration}" if prefix else f"iteration {iteration}/{self.train_iters}"
        parts = [head, f"lm loss {metrics['lm_loss']:.4f}"]
        depth = 1
        while f"mtp_{depth}_loss" in metrics:
            parts.append(
                f"mtp_{depth} loss {metrics[f'mtp_{depth}_loss']:.4f} acc {metrics[f'mtp_{depth}_acc']:.3f} "
                f"acc_main {metrics[f'mtp_{depth}_acc_main']:.3f}"
            )
            depth += 1
        parts += [f"{name} {metrics[name]:.4f}" for name in MOE_AUX_LOSS_NAMES if name in metrics]
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.3e}")
        if "grad_norm" in metrics:
            parts.append(f"grad norm {metrics['grad_norm']:.3f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:.0f} tokens/s")
        if "seconds_per_iter" in metrics:
            parts.append(f"{metrics['seconds_per_iter']:.2f} s/it")
        if "memory_gb" in metrics:
            parts.append(f"mem {metrics['memory_gb']:.2f} GB")
        return " | ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
