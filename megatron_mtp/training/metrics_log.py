"""Training metrics to a person (one step line), TensorBoard scalars and JSON lines."""

import json
import os
from typing import Dict, Optional

import torch

SCALAR_NAMES = {"lm_loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm", "tokens_per_s": "throughput/tokens-per-s"}


def memory_gb(device: str) -> float:
    """Peak GPU memory allocated, or this process's resident memory on CPU, in GB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


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
