"""Run a Megatron-LM ``pretrain_gpt.py`` on CPU over gloo, one process of a torchrun world (tests only).

    MEGATRON_LM_DIR=../shared/megatron-lm/core_v0.16.1 torchrun --nproc-per-node 2 cpu_launch.py pretrain_gpt.py ARGS

Megatron-LM has no CPU mode; what its ``pretrain()`` needs beyond megatron_mtp's CPU bridge is stood in for here,
test code only: the CUDA assertion and device count of ``initialize_megatron`` (so that Megatron-LM itself sets
up model parallelism and the RNG tracker), the fused-kernel build and the ``torch.compile`` warm-up, CUDA
RNG state and memory statistics, the GPU architecture, and on Python < 3.12 ``typing.override`` (imported by Megatron-LM core_r0.19.0).
"""

import functools
import os
import sys
import typing


def install_cpu_stand_ins() -> None:
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override

    import torch

    from megatron_mtp import cpu_bridge

    cpu_bridge.enable()
    torch.cuda.device_count = lambda: 1  # Megatron-LM initialises model parallelism and seeds only with a device
    torch.cuda.set_device = lambda device: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # checkpoints hold an RNG state
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_reserved = lambda device=None: 0
    torch.cuda.max_memory_reserved = lambda device=None: 0

    from megatron.training import arguments, initialize, training

    arguments.get_device_arch_version = lambda: 9  # pre-Blackwell rules (CUDA_DEVICE_MAX_CONNECTIONS=1)

    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    initialize._compile_dependencies = lambda: None
    training.set_jit_fusion_options = lambda *args, **kwargs: None


def main() -> None:
    script, megatron_lm_dir = os.path.abspath(sys.argv[1]), os.environ["MEGATRON_LM_DIR"]
    sys.path[:0] = [os.path.dirname(script), os.path.abspath(megatron_lm_dir)]
    sys.argv = [script, *sys.argv[2:]]
    install_cpu_stand_ins()
    # Not runpy.run_path: that makes the script the __main__ module, which the torch_dist checkpoint writer's
    # spawned helper process then imports, without these stand-ins (on Python 3.11 core_r0.19.0 fails there).
    with open(script) as f:
        code = compile(f.read(), script, "exec")
    exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
