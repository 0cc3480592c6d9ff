"""Run a function on N real processes joined in a gloo world with Megatron parallel state set up."""

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def run_world(
    fn, world_size: int, *args, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1, vpp=None, timeout: float = 600.0
):
    """Spawn ``world_size`` ranks, each running ``fn(*args)`` after ``initialize_model_parallel`` (``vpp``:
    virtual pipeline stages per rank, or None).

    ``fn`` must be importable (a module-level function). Returns the list of per-rank results.
    Raises with the failing rank's traceback if any rank fails.
    """
    from conftest import free_port

    with tempfile.TemporaryDirectory() as result_dir:
        context = _fresh_process_context()
        port = free_port()
        job = os.path.join(result_dir, "job.pt")
        torch.save((fn, args), job)  # a file, not the fork server's socket: it passes at most 256 tensors' fds
        procs = [
            context.Process(target=_rank_main, args=(rank, world_size, port, tp, pp, ep, cp, vpp, job, result_dir))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        failures = []
        for rank, proc in enumerate(procs):
            if proc.is_alive():
                proc.kill()
                failures.append(f"rank {rank}: timed out after {timeout}s")
            error_file = os.path.join(result_dir, f"{rank}.err")
            if os.path.exists(error_file):
                with open(error_file) as f:
                    failures.append(f"rank {rank}:\n{f.read()}")
            elif proc.exitcode != 0 and not proc.is_alive():
                failures.append(f"rank {rank}: exit code {proc.exitcode}")
        if failures:
            raise RuntimeError("distributed run failed\n" + "\n".join(failures))
        return [torch.load(os.path.join(result_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]


_PRELOADED = ("torch", "megatron.core.parallel_state", "megatron_mtp.cpu_bridge", "megatron_mtp.model")


def _fresh_process_context():
    """Every rank is a new process, forked from a server that imported torch and Megatron-Core once.

    ``spawn`` would re-import them in every rank of every world (seconds each); a fork of the server costs next to
    nothing and still shares no state with earlier worlds or with this process. The server forks before any
    thread pool or process group exists, and ranks set everything up themselves (``_rank_main``).
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOADED))
    return context


def _rank_main(rank, world_size, port, tp, pp, ep, cp, vpp, job, result_dir):
    try:
        fn, args = torch.load(job, weights_only=False)
        import warnings

        warnings.filterwarnings("ignore")
        from megatron.core import parallel_state

        from megatron_mtp import cpu_bridge

        cpu_bridge.enable()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores, as under torchrun
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=ep,
            context_parallel_size=cp,
        )
        cpu_bridge.manual_seed(1234)
        result = fn(*args)
        torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
