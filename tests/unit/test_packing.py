"""--reset-attention-mask: micro-batches become packed documents that end after each eod, and MTP (both modes)
neither attends, reads nor predicts across an eod."""

import pytest
import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_mtp import cpu_bridge
from megatron_mtp.config import MTPConfig
from megatron_mtp.data.packing import as_packed_documents, document_boundaries
from megatron_mtp.layers import get_mtp_block_spec
from megatron_mtp.loss import MTPStats
from megatron_mtp.model import MTPGPTModel
from packed_batches import forward, targets_per_depth
from tiny import SEQ, VOCAB, transformer_config

EOD = VOCAB - 1


def test_documents_end_after_each_eod_and_at_each_sample_end():
    tokens = torch.tensor([[5, EOD, 6, 7], [8, 9, EOD, 4], [1, 2, 3, EOD]])
    assert document_boundaries(tokens, EOD).tolist() == [0, 2, 4, 7, 8, 12]


def _sample_batch(seed: int) -> dict:
    """Two samples of SEQ tokens with eods inside, as GPTDataset gives them with --eod-mask-loss."""
    generator = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, EOD, (2, SEQ + 1), generator=generator)
    stream[0, [4, 6]] = EOD  # sample 0: documents of 5, 2 and 9 tokens; the 2-token one has no depth-2 target
    stream[1, 9] = EOD
    tokens, labels = stream[:, :-1].contiguous(), stream[:, 1:].contiguous()
    return dict(
        tokens=tokens, labels=labels, loss_mask=(tokens != EOD).float(),
        position_ids=torch.arange(SEQ).expand(2, SEQ).contiguous(), attention_mask=None,
    )


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_mtp_on_packed_documents_never_crosses_an_eod(single_process, mode):
    depths = 2
    mtp = MTPConfig(num_layers=depths, mode=mode)
    spec = cpu_bridge.with_packed_attention(get_gpt_layer_local_spec())
    model = MTPGPTModel(
        transformer_config(mtp, num_layers=2), spec, VOCAB, 2 * SEQ, mtp_config=mtp,
        mtp_block_spec=get_mtp_block_spec(spec, mtp), position_embedding_type="rope",
    )
    batch = _sample_batch(seed=0)
    batch["loss_mask"][0, :5] = 0  # no target in the first document: changing it must change nothing

    results = []
    for first_document in (batch["tokens"][0, :4], torch.arange(4) + 10):
        batch["tokens"][0, :4] = first_document
        batch["labels"][0, :3] = first_document[1:]
        stats = MTPStats(depths)
        packed = as_packed_documents(batch, EOD)
        per_token = forward(model, packed, mtp_stats=stats)
        results.append(((per_token * packed["loss_mask"]).sum().detach(), stats.values.clone()))

    (loss, stats), (changed_loss, changed_stats) = results
    torch.testing.assert_close(changed_loss, loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(changed_stats, stats, atol=1e-5, rtol=0)
    tokens = [stats[k, 1].item() for k in range(depths)]
    assert tokens == targets_per_depth(batch["tokens"], batch["loss_mask"], EOD, depths)
