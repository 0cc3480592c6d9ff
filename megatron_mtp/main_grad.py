"""What a weight gradient added straight into Megatron DDP's ``main_grad`` hands back to autograd.

Under gradient-accumulation fusion Megatron's linear layers add their weight gradient into the fp32
``param.main_grad`` themselves, set ``param.grad_added_to_main_grad`` and return a dummy gradient; DDP's
per-parameter hook then ignores ``param.grad`` (unless ``param.zero_out_wgrad`` is set, when it adds it: the
dummy is zero then). The chunked loss (``loss/chunked.py``) and the fused word-embedding lookup
(``layers/embedding_grad.py``) follow the same contract through :func:`weight_grad_in_main_grad`.

Per backward, one user of the weight returns the dummy and the others None: the dummy is what keeps
``param.grad`` set for DDP's hook under ``overlap_grad_reduce`` (which asserts it), and two gradients for one
weight would make autograd sum them into a new weight-sized tensor. Without overlap DDP's hook skips a None
``param.grad``: callers then pass ``stand_in=False`` (``MTPConfig.ddp_overlaps_grad_reduce``) and no user returns
the dummy, unless Megatron's own output layer does.
"""

from typing import Optional

import torch
from megatron.core.tensor_parallel import layers as mcore_layers


def weight_grad_in_main_grad(weight: torch.Tensor, dtype: torch.dtype, stand_in: bool) -> Optional[torch.Tensor]:
    """Mark ``weight``'s gradient as added into ``main_grad``; return Megatron's dummy ([*weight.shape] of
    ``dtype``) when ``stand_in``, else None."""
    if hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True
    if not stand_in:
        return None
    # What Megatron's fused linear returns: TE's cached buffer (no new memory) where Megatron-Core uses it, else a
    # new tensor, zero where DDP's hook adds param.grad into main_grad (zero_out_wgrad); freed by that hook.
    zero = getattr(weight, "zero_out_wgrad", False)
    if mcore_layers.HAVE_TE:
        return mcore_layers.get_dummy_wgrad(list(weight.shape), dtype, zero=zero)
    return (torch.zeros if zero else torch.empty)(weight.shape, dtype=dtype, device=weight.device)


def add_weight_grad_fp32(grad_weight: torch.Tensor, input: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``grad_weight [out, in] += grad_output [n, out]^T @ input [n, in]``, summed in fp32, in place.

    16-bit inputs are cast to fp32 a quarter of the rows at a time, so no fp32 copy of a whole ``[n, out]``
    gradient exists (a GEMM with fp32 accumulation, as apex's ``wgrad_gemm_accum_fp32``, makes none).
    """
    if input.dtype == grad_output.dtype == torch.float32:
        grad_weight.addmm_(grad_output.t(), input)
        return
    rows = max(1, -(-input.size(0) // 4))
    for start in range(0, input.size(0), rows):
        grad_weight.addmm_(grad_output[start : start + rows].t().float(), input[start : start + rows].float())
