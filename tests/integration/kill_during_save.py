"""Run the pretrain script in one process and SIGKILL it in the middle of saving iteration KILL_AT:
after the checkpoint's data is written to its staging directory, before it is committed."""

import os
import signal
import sys

from megatron_mtp.training import checkpointing

KILL_AT = int(os.environ["KILL_AT_ITERATION"])
_real_save = checkpointing.dist_checkpointing.save


def _save_then_die(state, directory, *args, **kwargs):
    _real_save(state, directory, *args, **kwargs)
    if directory.endswith(f"iter_{KILL_AT:07d}.partial"):
        os.kill(os.getpid(), signal.SIGKILL)


checkpointing.dist_checkpointing.save = _save_then_die

if __name__ == "__main__":
    from megatron_mtp.pretrain import main

    main(sys.argv[1:])
