"""Run Megatron-Core on CPU with the gloo backend (tests, the CPU demo).

Megatron-Core 0.16 assumes CUDA in a few dozen places: tensors created with ``device="cuda"`` or
``device=torch.cuda.current_device()``, ``.cuda()`` calls, CUDA RNG states behind the model-parallel RNG
tracker, streams and ``torch.cuda.synchronize()``. Rather than patching each call site, the bridge:

* makes ``torch.cuda.current_device()`` return the CPU device, which covers allocations in autograd
  backward functions too (torch function modes are not active there);
* installs a ``TorchFunctionMode`` that sends the remaining CUDA device requests (``device="cuda"``,
  ``.cuda()``, ``.to("cuda")``) to the CPU, drops requests for pinned memory (there is no pinned allocator
  without an accelerator; Megatron's context-parallel RoPE slicing asks for it), and names CPU tensors' types as
  CUDA types;
* makes ``torch.cuda.synchronize/empty_cache`` and the stream API harmless;
* replaces the model-parallel RNG tracker with one that forks the CPU generator;
* defines ``moe_utils.te_general_gemm`` (None) that the MoE router uses unguarded without TE;
* stands in for apex's ``fused_weight_gradient_mlp_cuda`` (the weight-gradient kernel of
  ``gradient_accumulation_fusion``: ``main_grad += grad_output^T @ input``), so fusion on runs on the CPU;
* hands that path TransformerEngine's one cached dummy weight gradient per shape, as on a TE host, instead of
  a fresh weight-sized ``torch.empty`` per call that GPU runs never allocate (memory measured here stays true);
* gives the alltoall MoE dispatcher numpy split sizes and events it can synchronize on;
* builds ``HybridStack``'s final norm (TransformerEngine's ``TENorm`` there in every spec) as a
  :class:`SequenceParallelNorm` where Megatron-Core has ``HybridModel``;
* offers :class:`SequenceParallelNorm` and :func:`with_sequence_parallel_norms` because Megatron's
  torch norm refuses sequence parallelism (TE or apex provide that norm on GPU);
* offers :func:`with_packed_attention` because Megatron's local core attention refuses packed (THD)
  micro-batches (TE or flash-attention take them on GPU);
* offers :func:`with_context_parallel_attention` because Megatron's local core attention refuses context
  parallelism (TE's attention implements it on GPU).

It is enabled explicitly with :func:`enable` and refuses to run where CUDA is available.
"""

import contextlib
import dataclasses
import sys
import threading
import types

import torch
from torch.overrides import TorchFunctionMode

from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_mtp import compat
from megatron_mtp.cpu_packed_attention import PackedSDPACoreAttention
from megatron_mtp.main_grad import add_weight_grad_fp32

_state = threading.local()
_CPU = torch.device("cpu")
_enabled = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to ``cpu``; ``Tensor.cuda()`` is the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron identifies dtypes by CUDA type names ("torch.cuda.FloatTensor").
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's model-parallel RNG tracker, holding and forking CPU generator states."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        # The alltoall MoE dispatcher synchronizes on the event it records.
        return event if event is not None else _NoEvent()


class _NoEvent:
    """Stands in for ``torch.cuda.Event``: on CPU the work it marks is already done."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


def _no_stream_context(stream=None):
    return contextlib.nullcontext()


def enable() -> None:
    """Bridge Megatron-Core's CUDA-only spots to the CPU in this process (idempotent, this thread)."""
    global _enabled
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_mtp.cpu_bridge is for CPU-only runs; CUDA is available here, so run on the GPU instead."
        )
    if not _enabled:
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.empty_cache = lambda: None
        torch.cuda.Stream = _NoStream
        torch.cuda.stream = _no_stream_context
        torch.cuda.current_stream = lambda device=None: _NoStream()
        torch.cuda.default_stream = lambda device=None: _NoStream()
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        mcore_random.initialize_rng_tracker = _keep_cpu_rng_tracker
        if not hasattr(moe_utils, "te_general_gemm"):  # referenced unguarded by the router without TE
            moe_utils.te_general_gemm = None
        token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor
        _install_wgrad_kernel()
        _install_dummy_wgrad()
        if compat.HAS_HYBRID_MODEL:
            from megatron.core.models.hybrid import hybrid_block

            hybrid_block.TENorm = SequenceParallelNorm  # its only use there: the stack's final norm
        _enabled = True
    if not getattr(_state, "mode", None):
        _state.mode = _CudaToCpu()
        _state.mode.__enter__()


def _host_tensor(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` for tensors already on the CPU: the alltoall MoE dispatcher asks for
    numpy split sizes (Megatron converts only CUDA tensors; torch's all_to_all_single refuses tensors)."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _install_wgrad_kernel() -> None:
    """Provide ``fused_weight_gradient_mlp_cuda`` where Megatron-Core looks for it: the module global of
    ``tensor_parallel.layers`` (whose ``ColumnParallelLinear`` refuses fusion without it) and ``sys.modules``
    (``utils.drain_embedding_wgrad_compute`` imports it when called). Same in Megatron-Core 0.16 and 0.19."""
    kernel = types.ModuleType("fused_weight_gradient_mlp_cuda", "CPU stand-in from megatron_mtp.cpu_bridge")
    kernel.wgrad_gemm_accum_fp32 = _wgrad_gemm_accum_fp32
    kernel.wgrad_gemm_accum_fp16 = _wgrad_gemm_accum_16bit
    sys.modules["fused_weight_gradient_mlp_cuda"] = kernel
    mcore_layers.fused_weight_gradient_mlp_cuda = kernel
    mcore_layers._grad_accum_fusion_available = True


def _install_dummy_wgrad() -> None:
    """Megatron's fused linear returns a dummy weight gradient once the real one is in ``main_grad``: TE's
    ``get_dummy_wgrad`` buffer where TE is installed, else a new ``[out, in]`` tensor per call. ``HAVE_TE`` in
    ``tensor_parallel.layers`` selects only that and a CPU-offloading check (0.16 and 0.19)."""
    mcore_layers.get_dummy_wgrad = _cached_dummy_wgrad
    mcore_layers.HAVE_TE = True


_dummy_wgrads = {}


def _cached_dummy_wgrad(shape: list, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """TE's ``get_dummy_wgrad``: one buffer per (shape, dtype), zeroed on request, never summed into in place."""
    key = (tuple(shape), dtype)
    if key not in _dummy_wgrads:
        _dummy_wgrads[key] = torch.empty(shape, dtype=dtype)
    if zero:
        _dummy_wgrads[key].zero_()
    return _dummy_wgrads[key].detach()


def _wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's kernel: ``main_grad [out, in] += grad_output [n, out]^T @ input [n, in]`` in fp32, in place (16-bit
    inputs read as they are: no fp32 copy of the whole ``grad_output``)."""
    add_weight_grad_fp32(main_grad, input, grad_output)


def _wgrad_gemm_accum_16bit(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a bf16/fp16 ``main_grad``: the sum is formed in fp32 and rounded once, as the GEMM does."""
    main_grad.add_(torch.mm(grad_output.t().float(), input.float()))


def _keep_cpu_rng_tracker(*args, **kwargs):
    """Megatron re-creates its tracker on demand; keep the CPU one instead."""
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def is_enabled() -> bool:
    return _enabled


def manual_seed(seed: int) -> None:
    """CPU counterpart of ``model_parallel_cuda_manual_seed``: seeds torch and the tracker states.

    The tensor-parallel state gets a seed offset by the TP rank (as Megatron does) so dropout differs
    across TP ranks inside TP regions; expert-parallel state likewise by the EP rank.
    """
    from megatron.core import parallel_state

    torch.manual_seed(seed)
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


class SequenceParallelNorm:
    """Megatron's torch LayerNorm/RMSNorm, usable with sequence parallelism.

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so the norm's
    weight gradient is partial; marking the parameters ``sequence_parallel`` makes Megatron's
    ``finalize_model_grads`` all-reduce them across the TP group.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"SequenceParallelNorm supports LayerNorm and RMSNorm, not {config.normalization}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec):
    """Return ``spec`` with every ``WrappedTorchNorm`` replaced by :class:`SequenceParallelNorm`.

    Works on any spec tree (layer specs, block submodules, the MTP block spec); the input is not modified.
    """
    return _substituted(spec, WrappedTorchNorm, SequenceParallelNorm)


def with_packed_attention(spec):
    """Return ``spec`` with Megatron's local ``DotProductAttention`` replaced by a core attention that also takes
    ``packed_seq_params`` (see ``cpu_packed_attention``); any spec tree, the input is not modified."""
    return _substituted(spec, DotProductAttention, PackedSDPACoreAttention)


def with_context_parallel_attention(spec):
    """Return ``spec`` with Megatron's local ``DotProductAttention`` replaced by the all-gather context-parallel
    attention of :mod:`megatron_mtp.cpu_cp_attention` (any spec tree, as :func:`with_sequence_parallel_norms`)."""
    from megatron_mtp.cpu_cp_attention import ContextParallelCoreAttention

    return _substituted(spec, DotProductAttention, ContextParallelCoreAttention)


def _substituted(spec, old: type, new: type):
    """``spec`` with every occurrence of the class ``old`` replaced by ``new``; the input is not modified."""
    if spec is old:
        return new
    if isinstance(spec, (list, tuple)):
        return type(spec)(_substituted(s, old, new) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(
            spec,
            **{f.name: _substituted(getattr(spec, f.name), old, new) for f in dataclasses.fields(spec) if f.init},
        )
    return spec
