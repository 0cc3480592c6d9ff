"""Save or load a tiny MTP model's torch_dist checkpoint in this interpreter's Megatron-Core release.

    python checkpoint_worker.py save DIR MODE          # our MTPGPTModel, seeded, saved to DIR
    python checkpoint_worker.py load DIR MODE          # a differently seeded MTPGPTModel, loaded from DIR
    python checkpoint_worker.py load-megatron DIR      # Megatron-Core's own GPTModel + MTP, loaded from DIR

Prints one JSON line: the release, the main loss and the per-depth MTP losses on a fixed batch (eval mode,
MTP computed), so two interpreters holding different releases can be compared.
"""

import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec  # noqa: E402

from conftest import free_port  # noqa: E402
from megatron_mtp import compat, cpu_bridge  # noqa: E402
from megatron_mtp.config import MTPConfig  # noqa: E402
from megatron_mtp.loss import MTPStats  # noqa: E402
from tiny import SEQ, VOCAB, build_model, decoder_spec, make_batches, transformer_config  # noqa: E402

DEPTHS = 2


def main(action: str, directory: str, mode: str = "sequential") -> None:
    cpu_bridge.enable()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    cpu_bridge.manual_seed(1 if action == "save" else 2)
    mtp = MTPConfig(num_layers=DEPTHS, mode=mode)
    config = transformer_config(mtp, num_layers=2)
    if action == "load-megatron":
        spec = decoder_spec(config)
        model = GPTModel(
            config, spec, VOCAB, SEQ, position_embedding_type="rope",
            mtp_block_spec=get_gpt_mtp_block_spec(config, spec.layer_specs[-1], use_transformer_engine=False),
        )
    else:
        model = build_model(config, mtp)
    if action == "save":
        os.makedirs(directory)
        compat.save_torch_dist(model.sharded_state_dict(), directory)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))
    print(json.dumps(dict(version=str(compat.MEGATRON_CORE_VERSION), **_losses(model, action == "load-megatron"))))
    torch.distributed.destroy_process_group()


def _losses(model, megatron_reference: bool) -> dict:
    batch = make_batches(1, seed=11)[0]
    inputs = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    mask = batch["loss_mask"]
    with torch.no_grad():
        if megatron_reference:  # its MTP runs (and logs) in training mode only; dropout is 0
            compat.MTPLossLoggingHelper.tracker.clear()
            main = model.train()(*inputs, labels=batch["labels"], loss_mask=mask)
            depths = compat.megatron_core_mtp_logged_losses().tolist()
        else:
            stats = MTPStats(DEPTHS)
            main = model.eval()(*inputs, labels=batch["labels"], loss_mask=mask, mtp_stats=stats, compute_mtp=True)
            depths = [stats.summary()[f"mtp_{k}_loss"] for k in range(1, DEPTHS + 1)]
    return dict(main=((main * mask).sum() / mask.sum()).item(), depths=depths)


if __name__ == "__main__":
    main(*sys.argv[1:])
