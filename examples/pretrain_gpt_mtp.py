"""Pretrain a GPT with multi-token prediction on Megatron-Core (thin entry point).

    python examples/pretrain_gpt_mtp.py                      # the embedded CPU demo
    torchrun --nproc-per-node 8 examples/pretrain_gpt_mtp.py --tensor-model-parallel-size 8 --data-path ...

Same as ``python -m megatron_mtp.pretrain``; see --help for every flag.
"""

import sys

from megatron_mtp.pretrain import main

if __name__ == "__main__":  # the torch_dist checkpoint writer re-imports this file in a spawned child
    main(sys.argv[1:])
